"""Tests for compressdit.quant.transform: layer rules, per-module plans and module swapping on a tiny DiT."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compressdit.errors import ConfigError
from compressdit.models import adapter_for
from compressdit.quant.layers import QuantLinear
from compressdit.quant.spec import LinearQuantSpec
from compressdit.quant.transform import (LayerRule, build_empty_layers, check_plan_fits, dequantize_layers,
                                         quantize_layers, quantized_modules, resolve_plan)
from tests.conftest import tiny_dit

W8 = LinearQuantSpec(w_bits=8, a_bits=8)
W4 = LinearQuantSpec(w_bits=4, group_size=32)
W2 = LinearQuantSpec(w_bits=2)


@pytest.fixture(scope="module")
def dit():
    return tiny_dit()


def test_rule_match_kinds():
    exact = LayerRule("transformer_blocks.0.attn1.to_q", W8)
    assert exact.matches("transformer_blocks.0.attn1.to_q", None)
    assert not exact.matches("transformer_blocks.0.attn1.to_q_extra", None)
    assert not exact.matches("transformer_blocks.10.attn1.to_q", None)
    regex = LayerRule(r"re:transformer_blocks\.\d+\.attn1\.to_[qk]", W8)
    assert regex.matches("transformer_blocks.3.attn1.to_k", None)
    assert not regex.matches("transformer_blocks.3.attn1.to_v", None)
    assert not regex.matches("transformer_blocks.3.attn1.to_q.lora", None)  # full match, not search
    assert not regex.matches("x.transformer_blocks.3.attn1.to_q", None)
    role = LayerRule("role:ffn_up", W8)
    assert role.matches("anything", "ffn_up") and not role.matches("ff.net.0.proj", "ffn_down")
    assert not role.matches("role:ffn_up", None)


def test_exact_proj_out_does_not_match_proj_out_1():
    rule = LayerRule("proj_out", None)
    assert rule.matches("proj_out", "head")
    assert not rule.matches("proj_out_1", "head") and not rule.matches("proj_out_2", "head")
    assert not LayerRule("re:proj_out", None).matches("proj_out_1", "head")


def test_first_matching_rule_wins_and_null_keeps_full_precision(dit):
    adapter = adapter_for(dit)
    rules = [
        LayerRule("role:attn_qkv", W4),
        LayerRule(r"re:transformer_blocks\.0\..*", W8),
        LayerRule("proj_out_1", None),
        LayerRule("role:embedder", None),
        LayerRule("re:.*", W2),
    ]
    plan = resolve_plan(dit, adapter, rules)
    assert set(plan) == set(adapter.linear_layers(dit))
    assert plan["transformer_blocks.0.attn1.to_q"] == W4        # role beats the later block-0 regex
    assert plan["transformer_blocks.1.attn1.to_v"] == W4
    assert plan["transformer_blocks.0.ff.net.2"] == W8
    assert plan["transformer_blocks.0.norm1.linear"] == W8
    assert plan["transformer_blocks.1.ff.net.2"] == W2
    assert plan["proj_out_1"] is None
    assert plan["proj_out_2"] == W2                              # the exact rule did not leak to proj_out_2
    assert plan["transformer_blocks.1.norm1.emb.timestep_embedder.linear_1"] is None  # embedder before catch-all
    assert plan["transformer_blocks.0.norm1.emb.timestep_embedder.linear_1"] == W8    # ... but after block 0's rule
    # without a catch-all, unmatched layers stay in full precision
    plan = resolve_plan(dit, adapter, [LayerRule("role:ffn_down", W8)])
    assert {n for n, s in plan.items() if s is not None} == {"transformer_blocks.0.ff.net.2",
                                                             "transformer_blocks.1.ff.net.2"}


def test_quantize_layers_swaps_only_planned_layers():
    model = tiny_dit()
    keep_weight = model.proj_out_1.weight.detach().clone()
    adapter = adapter_for(model)
    plan = resolve_plan(model, adapter, [LayerRule("proj_out_1", None), LayerRule("role:embedder", None),
                                         LayerRule("re:transformer_blocks\\..*", W4)])
    quantize_layers(model, plan)
    quantized = quantized_modules(model)
    assert set(quantized) == {n for n, s in plan.items() if s is not None}
    assert quantized["transformer_blocks.1.ff.net.2"].spec == W4
    assert type(model.proj_out_1) is nn.Linear and torch.equal(model.proj_out_1.weight, keep_weight)
    assert type(model.proj_out_2) is nn.Linear
    assert type(model.transformer_blocks[0].norm1.emb.timestep_embedder.linear_1) is nn.Linear
    dequantize_layers(model)
    assert not quantized_modules(model)
    assert type(model.transformer_blocks[1].ff.net[2]) is nn.Linear


def test_invalid_regex_is_a_config_error():
    with pytest.raises(ConfigError, match=r"rules\[0\]\.match: invalid regex 'transformer_blocks\.\(\['"):
        LayerRule.from_dict({"match": "re:transformer_blocks.([", "spec": None}, "rules[0]")


def test_rule_from_dict_parses_spec_strictly():
    rule = LayerRule.from_dict({"match": "role:attn_qkv", "spec": {"w_bits": 4, "group_size": 32}}, "r")
    assert rule.spec == LinearQuantSpec(w_bits=4, group_size=32)
    assert LayerRule.from_dict({"match": "proj_out_1", "spec": None}, "r").spec is None
    with pytest.raises(ConfigError, match="unknown key 'bits'"):
        LayerRule.from_dict({"match": "x", "spec": {"bits": 4}}, "r")


def test_group_size_not_dividing_in_features_names_the_layer():
    model = tiny_dit()
    plan = {"transformer_blocks.0.attn1.to_q": W8,  # fine: quantizing must not start before the whole plan fits
            "transformer_blocks.0.ff.net.2": LinearQuantSpec(w_bits=4, group_size=48)}
    with pytest.raises(ConfigError, match=r"transformer_blocks\.0\.ff\.net\.2: in_features 256 is not divisible "
                                          r"by group_size 48"):
        quantize_layers(model, plan)
    assert not quantized_modules(model), "a failing plan left the model half-quantized"


def test_plan_naming_a_missing_or_non_linear_module_is_a_config_error(dit):
    with pytest.raises(ConfigError, match="'transformer_blocks.7.attn1.to_q'"):
        check_plan_fits(dit, {"transformer_blocks.7.attn1.to_q": W8})
    with pytest.raises(ConfigError, match="'transformer_blocks.0.attn1'.*not a Linear"):
        check_plan_fits(dit, {"transformer_blocks.0.attn1": W8})
    with pytest.raises(ConfigError, match="'nope'"):
        build_empty_layers(tiny_dit(), {"nope": W8})


def test_build_empty_layers_makes_empty_quantized_modules_of_the_planned_shapes():
    model = tiny_dit()
    build_empty_layers(model, {"transformer_blocks.0.ff.net.2": W2, "transformer_blocks.1.attn1.to_k": W4})
    q = model.transformer_blocks[0].ff.net[2]
    assert isinstance(q, QuantLinear) and q.weight.shape == (64, 64) and q.weight.dtype == torch.uint8
    assert model.transformer_blocks[1].attn1.to_k.weight_scale.shape == (64, 2)


def test_quantizing_an_already_quantized_layer_is_refused():
    from compressdit.errors import ConfigError
    from compressdit.models import adapter_for
    from compressdit.quant.transform import LayerRule, quantize_layers, resolve_plan
    from tests.conftest import tiny_dit

    model = tiny_dit()
    rules = [LayerRule.from_dict({"match": "re:.*attn1\\.to_q", "spec": {"w_bits": 8}})]
    quantize_layers(model, resolve_plan(model, adapter_for(model), rules))
    with pytest.raises(ConfigError, match="already quantized"):
        quantize_layers(model, resolve_plan(model, adapter_for(model), rules))


def test_a_rule_with_an_unknown_role_is_a_config_error():
    with pytest.raises(ConfigError, match=r"rules\[0\]\.match: unknown role 'embeder'; roles: .*embedder"):
        LayerRule.from_dict({"match": "role:embeder", "spec": None}, "rules[0]")


def test_a_rule_naming_no_linear_layer_is_a_config_error_with_the_closest_name():
    """A typo in an exact name would leave that layer to the next rule (quantized) without a word."""
    model = tiny_dit()
    rules = [LayerRule.from_dict({"match": "transformer_blocks.0.attn1.to_qq", "spec": None}, "r"),
             LayerRule.from_dict({"match": "re:.*", "spec": {"w_bits": 8}}, "r")]
    with pytest.raises(ConfigError, match=r"'transformer_blocks\.0\.attn1\.to_qq' names no linear layer of "
                                          r"DiTTransformer2DModel; did you mean 'transformer_blocks\.0\.attn1\.to_q'"):
        resolve_plan(model, adapter_for(model), rules)
    plan = resolve_plan(model, adapter_for(model), [LayerRule.from_dict({"match": "transformer_blocks.0.attn1.to_q",
                                                                        "spec": None}, "r"), rules[1]])
    assert plan["transformer_blocks.0.attn1.to_q"] is None and plan["transformer_blocks.0.attn1.to_k"] is not None

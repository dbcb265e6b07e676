"""Tests for compressdit.prune.width (and the width manifest's reload) on tiny DiT, PixArt, SD3 and Flux models."""

from __future__ import annotations

import copy
import functools
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import compressdit  # noqa: F401  (registers the loader backend, as a user would)
from compressdit.errors import CheckpointError, ConfigError
from compressdit.io.diffusers_quantizer import attach_quantizer
from compressdit.models import ADAPTERS
from compressdit.models.text_conditions import synthetic_text
from compressdit.prune.width import CalibrationBatch, WidthConfig, prune_width
from compressdit.quant.layers import QuantLinear
from compressdit.quant.spec import LinearQuantSpec
from compressdit.quant.transform import LayerRule, quantize_layers, quantized_modules, resolve_plan
from tests.conftest import tiny_dit, tiny_flux, tiny_pixart, tiny_sd3

torch.set_num_threads(1)

FAMILIES = ("dit", "pixart", "sd3", "flux")
TEXT_SEQ, TEXT_DIM, POOLED_DIM = 5, 48, 40
HALF = WidthConfig(ffn_ratio=0.25, head_ratio=0.5)


@functools.lru_cache(maxsize=None)
def _built(family: str) -> nn.Module:
    if family == "dit":
        return tiny_dit(layers=2)
    if family == "pixart":
        return tiny_pixart(layers=2, caption_channels=TEXT_DIM)
    if family == "sd3":  # block 0 has SD3.5 dual attention; block 1 is context_pre_only (no to_add_out)
        return tiny_sd3(2, (0,), TEXT_DIM, POOLED_DIM)
    return tiny_flux(1, 2, 4, TEXT_DIM, POOLED_DIM)


def tiny_model(family: str) -> nn.Module:
    return copy.deepcopy(_built(family))


def _inputs(family: str, model: nn.Module):
    adapter = ADAPTERS.get(family)
    latents = torch.randn(2, *adapter.latent_shape(model), generator=torch.Generator().manual_seed(5))
    conditions = ([3, 7] if family == "dit" else
                  synthetic_text(2, TEXT_SEQ, TEXT_DIM, POOLED_DIM if family in ("sd3", "flux") else None))
    return latents, torch.tensor([500.0]), adapter.encode(model, conditions)


def predict(family: str, model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return ADAPTERS.get(family).predict(model, *_inputs(family, model))


def _attentions(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(getattr(m, "to_q", None), nn.Linear)}


def _head_dim(attn: nn.Module) -> int:
    return attn.to_q.out_features // attn.heads


def _mlps(model: nn.Module) -> dict[str, tuple[nn.Linear, nn.Linear, int]]:
    """``(up, down, column offset of the hidden channels in down's input)`` of every MLP, by up's name."""
    from diffusers.models.attention import FeedForward

    mlps = {f"{n}.net.0.proj": (m.net[0].proj, m.net[2], 0) for n, m in model.named_modules()
            if isinstance(m, FeedForward)}
    for i, block in enumerate(getattr(model, "single_transformer_blocks", [])):  # concat(attention, MLP)
        mlps[f"single_transformer_blocks.{i}.proj_mlp"] = (block.proj_mlp, block.proj_out, block.attn.to_q.out_features)
    return mlps


def _head_columns(model: nn.Module, name: str, attn: nn.Module) -> list[nn.Linear]:
    """Layers whose input columns carry the heads of ``attn``."""
    if getattr(attn, "to_out", None) is None:
        return [model.get_submodule(name.rpartition(".")[0]).proj_out]
    return [attn.to_out[0]] + ([attn.to_add_out] if getattr(attn, "to_add_out", None) is not None else [])


def _head_rows(attn: nn.Module) -> list[nn.Linear]:
    names = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")
    return [getattr(attn, n) for n in names if getattr(attn, n, None) is not None]


# shapes -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_shapes_are_consistent_and_the_ratio_is_respected(family: str) -> None:
    original, model = _built(family), tiny_model(family)
    changed = prune_width(model, ADAPTERS.get(family), HALF)
    assert predict(family, model).shape == predict(family, original).shape
    before, mlps = _attentions(original), _mlps(model)
    for name, attn in _attentions(model).items():
        ref, dim = before[name], _head_dim(before[name])
        assert attn.heads == ref.heads // 2 and changed["heads"][name] == attn.heads, name
        for new, old in zip(_head_rows(attn), _head_rows(ref), strict=True):
            assert (new.out_features, new.in_features) == (attn.heads * dim, old.in_features)  # inputs keep width
        for new, old in zip(_head_columns(model, name, attn), _head_columns(original, name, ref), strict=True):
            assert new.out_features == old.out_features
            mlp = [up.out_features for up, down, _ in mlps.values() if down is new]  # concat(attention, MLP)
            assert new.in_features == attn.heads * dim + sum(mlp), name
    old_mlps = _mlps(original)
    for name, (up, down, _) in mlps.items():
        (old_up, old_down, _), hidden = old_mlps[name], old_mlps[name][0].out_features
        assert (up.out_features, up.in_features) == (hidden - hidden // 4, old_up.in_features), name
        assert down.out_features == old_down.out_features
    shapes = {n: [m.out_features, m.in_features] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    unchanged = {n: [m.out_features, m.in_features] for n, m in original.named_modules() if isinstance(m, nn.Linear)}
    assert shapes == {**unchanged, **changed["width"]}  # the report names every changed linear, and only those
    assert all(unchanged[n] != s for n, s in changed["width"].items())


def test_pixart_cross_attention_keeps_its_text_input_width() -> None:
    model = tiny_model("pixart")
    text_dim = model.transformer_blocks[0].attn2.to_k.in_features
    prune_width(model, ADAPTERS.get("pixart"), WidthConfig(head_ratio=0.5, roles=["cross_q"]))
    for block in model.transformer_blocks:
        assert block.attn2.heads == 1 and block.attn1.heads == 2
        assert block.attn2.to_k.in_features == block.attn2.to_v.in_features == text_dim
        assert block.attn2.to_k.out_features == block.attn2.to_out[0].in_features == 32
    assert predict("pixart", model).isfinite().all()


def test_ffn_multiple_and_block_selection() -> None:
    model = tiny_model("dit")
    config = WidthConfig(ffn_ratio=0.25, ffn_multiple=100, blocks=[r"transformer_blocks\.1"], roles=["ffn_up"])
    prune_width(model, ADAPTERS.get("dit"), config)
    assert model.transformer_blocks[0].ff.net[2].in_features == 256  # block 0 not selected
    assert model.transformer_blocks[1].ff.net[2].in_features == 200  # 192 kept, rounded to a multiple of 100
    assert [b.attn1.heads for b in model.transformer_blocks] == [2, 2]


# which channels go --------------------------------------------------------------------------------------------


def _zero_some(model: nn.Module) -> None:
    """Zero a quarter of every MLP's hidden channels (j % 4 == 1) and every attention's odd heads."""
    with torch.no_grad():
        for up, down, offset in _mlps(model).values():
            idx = torch.arange(1, up.out_features, 4)
            up.weight[idx] = 0
            up.bias[idx] = 0
            down.weight[:, offset + idx] = 0
        for name, attn in _attentions(model).items():
            dim = _head_dim(attn)
            idx = torch.cat([torch.arange(h * dim, (h + 1) * dim) for h in range(1, attn.heads, 2)])
            for linear in _head_rows(attn):
                linear.weight[idx] = 0
                if linear.bias is not None:
                    linear.bias[idx] = 0
            for linear in _head_columns(model, name, attn):
                linear.weight[:, idx] = 0


@pytest.mark.parametrize("family", FAMILIES)
def test_pruning_zero_channels_and_heads_preserves_the_function(family: str) -> None:
    model = tiny_model(family)
    _zero_some(model)
    zeroed, expected = copy.deepcopy(model), predict(family, model)
    prune_width(model, ADAPTERS.get(family), HALF)
    torch.testing.assert_close(predict(family, model), expected, rtol=0, atol=1e-5)
    for name, (up, _, _) in _mlps(model).items():  # exactly the zeroed channels went
        old = _mlps(zeroed)[name][0].weight
        keep = [j for j in range(old.shape[0]) if j % 4 != 1]
        assert torch.equal(up.weight, old[keep]), name
    for name, attn in _attentions(model).items():  # exactly the zeroed (odd) heads went, whole
        old, dim = _attentions(zeroed)[name], _head_dim(attn)
        for new, ref in zip(_head_rows(attn), _head_rows(old)):
            assert torch.equal(new.weight.view(attn.heads, dim, -1), ref.weight.view(old.heads, dim, -1)[0::2]), name


def test_random_weights_lose_whole_heads_alike_in_both_streams() -> None:
    model, original = tiny_model("flux"), _built("flux")
    prune_width(model, ADAPTERS.get("flux"), WidthConfig(head_ratio=0.5, roles=["attn_qkv"]))
    attn, ref = model.transformer_blocks[0].attn, original.transformer_blocks[0].attn
    old_heads = ref.to_q.weight.view(4, 16, -1)
    kept = [h for h in range(4) if any(torch.equal(w, old_heads[h]) for w in attn.to_q.weight.view(2, 16, -1))]
    assert len(kept) == 2
    channels = torch.cat([torch.arange(h * 16, (h + 1) * 16) for h in kept])
    for new, old in zip(_head_rows(attn) + [attn.to_out[0].weight.T, attn.to_add_out.weight.T],
                        _head_rows(ref) + [ref.to_out[0].weight.T, ref.to_add_out.weight.T]):
        new, old = getattr(new, "weight", new), getattr(old, "weight", old)
        assert torch.equal(new, old[channels])  # the same heads in the image and the text stream


def _crafted_dit() -> nn.Module:
    """Channel 0 of every FFN: large up-row but zero down-column (big, useless); channel 5: small but used."""
    model = tiny_model("dit")
    with torch.no_grad():
        for block in model.transformer_blocks:
            block.ff.net[0].proj.weight[0] *= 50
            block.ff.net[2].weight[:, 0] = 0
            block.ff.net[0].proj.weight[5] *= 0.01
            block.ff.net[2].weight[:, 5] *= 0.01
    return model


def _kept_first_row(model: nn.Module, original: nn.Module) -> list[bool]:
    return [torch.equal(b.ff.net[0].proj.weight[0], o.ff.net[0].proj.weight[0])
            for b, o in zip(model.transformer_blocks, original.transformer_blocks)]


def test_magnitude_and_taylor_disagree_on_a_crafted_channel() -> None:
    adapter, crafted = ADAPTERS.get("dit"), _crafted_dit()
    latents, timestep, cond = _inputs("dit", crafted)
    target = torch.randn(latents.shape, generator=torch.Generator().manual_seed(1))
    config = dict(ffn_ratio=1 / 256, roles=["ffn_up"])  # one channel per FFN

    magnitude = copy.deepcopy(crafted)
    prune_width(magnitude, adapter, WidthConfig(importance="magnitude", **config))
    assert _kept_first_row(magnitude, crafted) == [True, True]  # the big channel stays, channel 5 goes

    taylor = copy.deepcopy(crafted)
    taylor.transformer_blocks[1].requires_grad_(False)  # frozen layers stay frozen afterwards
    prune_width(taylor, adapter, WidthConfig(importance="taylor", **config),
                loss_fn=lambda m: F.mse_loss(adapter.predict(m, latents, timestep, cond), target))
    assert _kept_first_row(taylor, crafted) == [False, False]  # |w * grad| = 0: the useless channel goes
    assert all(p.grad is None for p in taylor.parameters())
    assert taylor.transformer_blocks[0].ff.net[2].weight.requires_grad
    assert not taylor.transformer_blocks[1].ff.net[2].weight.requires_grad

    batches = copy.deepcopy(crafted)
    prune_width(batches, adapter, WidthConfig(importance="taylor", **config),
                calibration_batches=[CalibrationBatch(latents, timestep, cond, target)])
    assert all(torch.equal(a, b) for a, b in zip(batches.state_dict().values(), taylor.state_dict().values()))


# reload -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_model_reloads_with_stock_from_pretrained(family: str, tmp_path) -> None:
    model = tiny_model(family)
    changed = prune_width(model, ADAPTERS.get(family), HALF)
    expected = predict(family, model)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved["modules"] == {} and saved["structure"] == changed
    loaded = type(model).from_pretrained(tmp_path)
    assert {n: a.heads for n, a in _attentions(loaded).items()} == {n: a.heads for n, a in _attentions(model).items()}
    assert torch.equal(predict(family, loaded), expected)


@pytest.mark.parametrize("family", ["dit", "flux"])
def test_pruned_then_quantized_model_reloads_and_dequantizes(family: str, tmp_path) -> None:
    adapter, model = ADAPTERS.get(family), tiny_model(family)
    prune_width(model, adapter, HALF)
    rules = [LayerRule("role:embedder", None), LayerRule("role:head", None),
             LayerRule("re:.*", LinearQuantSpec(w_bits=8, a_bits=8))]
    plan = resolve_plan(model, adapter, rules)
    quantize_layers(model, plan)
    attach_quantizer(model, {n: s for n, s in plan.items() if s is not None})  # keeps the width manifest
    expected = predict(family, model)
    model.save_pretrained(tmp_path / "q")
    loaded = type(model).from_pretrained(tmp_path / "q")
    assert set(quantized_modules(loaded)) == set(quantized_modules(model))
    up = next(iter(_mlps(loaded).values()))[0]
    assert isinstance(up, QuantLinear) and up.out_features == 192
    assert torch.equal(predict(family, loaded), expected)
    loaded.dequantize()  # a plain float model again, but still pruned: the manifest stays
    dequantized = predict(family, loaded)
    loaded.save_pretrained(tmp_path / "f")
    assert torch.equal(predict(family, type(model).from_pretrained(tmp_path / "f")), dequantized)


def _broken(tmp_path, edit):
    model = tiny_model("dit")
    prune_width(model, ADAPTERS.get("dit"), HALF)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    edit(config["quantization_config"]["structure"])
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


MISMATCHES = [
    (lambda s: s["width"].update({"transformer_blocks.0.ff.net.2": [64, 200]}),
     r"transformer_blocks\.0\.ff\.net\.2\.weight: checkpoint shape \(64, 192\) does not match the width recorded "
     r"in quantization_config\.structure for transformer_blocks\.0\.ff\.net\.2 \(\(64, 200\)\)"),
    (lambda s: s["width"].update({"transformer_blocks.7.ff.net.2": [64, 192]}),
     r"structure\.width names 'transformer_blocks\.7\.ff\.net\.2', which DiTTransformer2DModel does not have"),
    (lambda s: s["heads"].update({"transformer_blocks.1.attn1": 2}),
     r"transformer_blocks\.1\.attn1 has 2 heads of 32 channels but transformer_blocks\.1\.attn1\.to_q has 32"),
    (lambda s: s["width"].update({"transformer_blocks.0.ff.net.2": [64]}), r"must be \[out_features, in_features\]"),
]


@pytest.mark.parametrize("edit, message", MISMATCHES)
def test_manifest_that_contradicts_the_checkpoint_is_a_one_line_error(tmp_path, edit, message: str) -> None:
    with pytest.raises(CheckpointError, match=message) as info:
        type(_built("dit")).from_pretrained(_broken(tmp_path, edit))
    assert "\n" not in str(info.value)


# configuration ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("data, message", [
    ({"ffn_ratio": 1.0}, r"ffn_ratio: must be in \[0, 1\)"),
    ({"importance": "hessian"}, "unknown 'hessian'; known: magnitude, taylor"),
    ({"roles": ["attn_out"]}, "'attn_out' cannot be width-pruned"),
    ({"heads": 2}, "unknown key 'heads'"),
    ({"blocks": ["("]}, "invalid regex"),
])
def test_config_is_strict(data: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        WidthConfig.from_dict(data, "prune_width")


def test_taylor_without_data_and_quantized_layers_are_refused() -> None:
    adapter, model = ADAPTERS.get("dit"), tiny_model("dit")
    with pytest.raises(ConfigError, match="needs gradients: pass calibration_batches or loss_fn"):
        prune_width(model, adapter, WidthConfig(ffn_ratio=0.25, importance="taylor"))
    quantize_layers(model, {"transformer_blocks.0.ff.net.2": LinearQuantSpec(w_bits=8)})
    with pytest.raises(ConfigError, match=r"transformer_blocks\.0\.ff\.net\.2 is already quantized; prune width first"):
        prune_width(model, adapter, HALF)

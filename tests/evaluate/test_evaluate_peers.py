"""Peer baselines (bitsandbytes, torchao) replace the named linears of a model and stay close to it."""

from __future__ import annotations

import pytest
import torch

from compressdit.evaluate.peers import PEERS, apply_peer
from compressdit.models import adapter_for
from tests.conftest import tiny_dit


@pytest.mark.parametrize("peer,bound", [("bnb-int8", 0.05), ("bnb-nf4", 0.5), ("torchao-int8-dynamic", 0.05),
                                        ("torchao-int8-weight", 0.05)])
def test_peer_replaces_exactly_the_named_layers_and_stays_close(peer, bound):
    model = tiny_dit()
    names = [n for n in adapter_for(model).linear_layers(model) if "transformer_blocks" in n]
    inputs = {"hidden_states": torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)),
              "timestep": torch.tensor([10, 500]), "class_labels": torch.tensor([1, 7]), "return_dict": False}
    with torch.no_grad():
        expected = model(**inputs)[0]
        apply_peer(model, names, peer)
        out = model(**inputs)[0]
    changed = [n for n, m in model.named_modules() if n in names and type(m).__module__ != "torch.nn.modules.linear"
               or n in names and type(m.weight) is not torch.nn.Parameter]
    assert sorted(changed) == sorted(names), PEERS.get(peer).description
    error = float((out - expected).norm() / expected.norm())
    assert 0 < error < bound, error


def _inputs(seed: int):
    return {"hidden_states": torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(seed)),
            "timestep": torch.tensor([10, 500]), "class_labels": torch.tensor([1, 7]), "return_dict": False}


@pytest.mark.parametrize("peer,bound", [("modelopt-int8-sq", 0.1), ("modelopt-fp8", 0.2),
                                        ("modelopt-int4-awq", 0.5), ("modelopt-w4a8-awq", 0.5)])
def test_modelopt_peer_calibrates_and_quantizes_exactly_the_named_layers(peer, bound):
    model = tiny_dit()
    names = [n for n in adapter_for(model).linear_layers(model) if "transformer_blocks.0." in n]
    calls = []

    def calibrate(m):
        calls.append(m)
        with torch.no_grad():
            for seed in range(2):
                m(**_inputs(seed))

    with torch.no_grad():
        expected = model(**_inputs(9))[0]
        apply_peer(model, names, peer, calibrate)
        out = model(**_inputs(9))[0]
    assert calls and all(m is model for m in calls)
    enabled = sorted(n.rpartition(".")[0] for n, m in model.named_modules()
                     if n.endswith("weight_quantizer") and m.is_enabled)
    assert enabled == sorted(names)  # blocks.1, embedders, head and convs: quantizers off
    error = float((out - expected).norm() / expected.norm())
    assert 0 < error < bound, error


def test_calibrating_peer_without_a_loop_is_a_one_line_error():
    from compressdit.errors import ConfigError

    model = tiny_dit()
    with pytest.raises(ConfigError, match="calibrates"):
        apply_peer(model, ["transformer_blocks.0.attn1.to_q"], "modelopt-fp8")

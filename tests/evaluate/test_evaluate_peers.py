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

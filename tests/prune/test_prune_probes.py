"""Tests for compressdit.prune.probes: normal equations, linear CKA, probes and replaceability."""

from __future__ import annotations

import pytest
import torch

from compressdit.models import ADAPTERS
from compressdit.prune.probes import _NormalEquations, _probe, fit_probes, linear_cka, simulate
from tests.conftest import tiny_dit, tiny_flux
from tests.prune.test_prune_importance import _make_identity
from tests.prune.test_prune_ppcl import _batches

torch.set_num_threads(1)
DIT, FLUX = ADAPTERS.get("dit"), ADAPTERS.get("flux")
BLOCKS = "transformer_blocks"


# probes and CKA --------------------------------------------------------------------------------------------


def test_normal_equations_recover_a_linear_map() -> None:
    gen = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(6, 5, generator=gen), torch.randn(5, generator=gen)
    equations = _NormalEquations()
    for _ in range(3):  # accumulated over batches of [batch, tokens, channels]
        x = torch.randn(4, 10, 6, generator=gen)
        equations.add(x, x @ weight + bias)
    probe, r2 = equations.solve(ridge=0.0)
    x = torch.randn(7, 6, generator=gen)
    torch.testing.assert_close(_probe(probe, x), x @ weight + bias, atol=1e-5, rtol=1e-5)
    assert r2 == pytest.approx(1.0, abs=1e-9)
    noisy = _NormalEquations()
    x = torch.randn(200, 6, generator=gen)
    noisy.add(x, x @ weight + 3 * torch.randn(200, 5, generator=gen))
    assert 0 < noisy.solve(ridge=1e-3)[1] < 0.9


def test_linear_cka_is_one_for_equivalent_representations_and_small_for_unrelated() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(500, 8, generator=gen)
    rotation, _ = torch.linalg.qr(torch.randn(8, 8, generator=gen))
    assert linear_cka(x, x) == pytest.approx(1.0)
    assert linear_cka(x, 3 * x @ rotation + 1) == pytest.approx(1.0)  # scale, rotation, shift invariant
    assert linear_cka(x, torch.randn(500, 8, generator=gen)) < 0.1


@pytest.mark.parametrize("family, model", [("dit", lambda: tiny_dit(layers=3)),
                                           ("flux", lambda: tiny_flux(1, 2, 2, 24, 20))])
def test_probes_of_identity_blocks_are_exact_and_fully_replaceable(family: str, model) -> None:
    model, adapter = model().eval(), ADAPTERS.get(family)
    identity = (adapter.block_list(model)[1][0], adapter.block_list(model)[1][1])
    _make_identity(model, adapter, {identity})
    batches = _batches(family, model)
    probes, r2 = fit_probes(model, adapter, batches, ridge=0.0)
    assert set(probes) == {(s, i) for s, i, _ in adapter.block_list(model)}
    if family == "flux":  # joint blocks return (and get probes for) both streams
        assert set(probes[identity]) == {"hidden_states", "encoder_hidden_states"}
    assert r2[identity] == pytest.approx(1.0, abs=1e-6)
    scores = simulate(model, adapter, probes, batches)
    assert scores[identity] == pytest.approx(1.0, abs=1e-6)
    assert all(0 <= v <= 1 + 1e-9 for v in scores.values())
    assert min(scores.values()) < 0.999  # a real (random) block is not linear

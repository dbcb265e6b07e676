"""Tests for compressdit.distill.losses and .objectives: loss values, layer maps, masking, hooks, noising."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from compressdit.distill.losses import (capture_features, data_loss, feature_loss, massive_activation_mask,
                                        output_loss, resolve_layer_map)
from compressdit.distill.objectives import (OBJECTIVES, EpsilonObjective, FlowObjective, VelocityObjective,
                                          objective_for)
from compressdit.errors import ConfigError
from compressdit.models import ADAPTERS
from compressdit.models.base import BlockStack
from compressdit.prune.depth import remove_blocks
from tests.conftest import tiny_dit

torch.set_num_threads(1)
DIT = ADAPTERS.get("dit")


def _outputs(model, blocks, seed=0):
    """Prediction and captured block features of ``model`` on a fixed batch."""
    gen = torch.Generator().manual_seed(seed)
    x, t = torch.randn(3, 4, 8, 8, generator=gen), torch.tensor([10, 500, 900])
    with torch.no_grad(), capture_features(model, DIT, blocks) as feats:
        pred = DIT.predict(model, x, t, DIT.encode(model, [1, 2, 1000]))
    return pred, [feats[b] for b in blocks]


@pytest.mark.parametrize("mask", [False, True])
def test_losses_zero_for_identical_models_positive_otherwise(mask):
    teacher = tiny_dit(layers=3)
    same = copy.deepcopy(teacher)
    pairs = resolve_layer_map(DIT, same, teacher)
    assert pairs == [(0, 0), (1, 1), (2, 2)]
    t_pred, t_feats = _outputs(teacher, [t for _, t in pairs])
    s_pred, s_feats = _outputs(same, [s for s, _ in pairs])
    assert output_loss(s_pred, t_pred) == 0
    assert feature_loss(s_feats, t_feats, mask) == 0

    pruned = remove_blocks(copy.deepcopy(teacher), DIT, {"transformer_blocks": [0, 2]})
    pairs = resolve_layer_map(DIT, pruned, teacher, origin=[0, 2])
    p_pred, p_feats = _outputs(pruned, [s for s, _ in pairs])
    _, t_feats = _outputs(teacher, [t for _, t in pairs])
    assert output_loss(p_pred, t_pred) > 0
    assert feature_loss(p_feats, t_feats, mask) > 0
    assert data_loss(p_pred, t_pred) == output_loss(p_pred, t_pred)


def _stacks(**counts):
    """A model with one ``nn.ModuleList`` per stack and an adapter-like object listing the stacks."""
    model = nn.Module()
    for name, count in counts.items():
        setattr(model, name, nn.ModuleList(nn.Identity() for _ in range(count)))
    return model, SimpleNamespace(block_stacks=tuple(BlockStack(name, f"num_{name}") for name in counts))


@pytest.mark.parametrize("student, teacher, expected", [
    (2, 4, [1, 3]),
    (14, 28, [2 * i + 1 for i in range(14)]),  # TinyFusion's D14 <- XL map
    (8, 12, [1, 2, 4, 5, 7, 8, 10, 11]),  # halves round up: evenly spread
    (3, 3, [0, 1, 2]),
    (1, 5, [4]),
])
def test_auto_layer_map_proportional(student, teacher, expected):
    s_model, adapter = _stacks(blocks=student)
    t_model, _ = _stacks(blocks=teacher)
    assert resolve_layer_map(adapter, s_model, t_model) == list(enumerate(expected))


def test_auto_layer_map_per_stack_and_from_origin():
    s_model, adapter = _stacks(joint=2, single=2)
    t_model, _ = _stacks(joint=4, single=4)
    # execution order: teacher joint 0..3, single 4..7; student joint 0..1, single 2..3
    assert resolve_layer_map(adapter, s_model, t_model) == [(0, 1), (1, 3), (2, 5), (3, 7)]
    assert resolve_layer_map(adapter, s_model, t_model, origin={"joint": [0, 2]}) == [(0, 0), (1, 2), (2, 5), (3, 7)]
    single_model, single_adapter = _stacks(blocks=2)
    teacher_model, _ = _stacks(blocks=4)
    assert resolve_layer_map(single_adapter, single_model, teacher_model, origin=[1, 2]) == [(0, 1), (1, 2)]


def test_explicit_layer_maps():
    s_model, adapter = _stacks(blocks=3)
    t_model, _ = _stacks(blocks=6)
    assert resolve_layer_map(adapter, s_model, t_model, [0, 3, 5]) == [(0, 0), (1, 3), (2, 5)]
    assert resolve_layer_map(adapter, s_model, t_model, [[2, 5]]) == [(2, 5)]


@pytest.mark.parametrize("layer_map, origin, needle", [
    ("auto", None, "cannot be mapped"),  # student deeper than teacher
    ([0, 1], None, "one teacher block per student block"),
    ([[0, 9]], None, "out of range"),
    ("auto", [0, 1], "one teacher index"),
    ("auto", [0, 1, 7, 2], "one teacher index"),
    ("nearest", None, "must be 'auto'"),
])
def test_layer_map_errors(layer_map, origin, needle):
    s_model, adapter = _stacks(blocks=4)
    t_model, _ = _stacks(blocks=3)
    with pytest.raises(ConfigError, match=needle):
        resolve_layer_map(adapter, s_model, t_model, layer_map, origin)


def test_massive_activation_mask_zeroes_exactly_the_outliers():
    gen = torch.Generator().manual_seed(0)
    h = torch.rand(2, 16, 32, generator=gen) - 0.5  # |h| < 0.5, std ~0.29 (then larger from the outliers)
    outliers = [(0, 3, 7), (0, 10, 0), (1, 5, 31)]
    for b, i, j in outliers:
        h[b, i, j] = 40.0 if b == 0 else -60.0
    keep = massive_activation_mask(h)
    expected = torch.ones_like(h, dtype=torch.bool)
    for b, i, j in outliers:
        expected[b, i, j] = False
    assert torch.equal(keep, expected)
    masked = h * keep
    assert torch.equal(masked[keep], h[keep]) and masked[~keep].abs().sum() == 0
    # per-sample statistics: sample 1 alone gives the same mask as in the batch
    assert torch.equal(massive_activation_mask(h[1:]), keep[1:])


def test_masking_is_separate_for_student_and_teacher():
    teacher = torch.zeros(1, 8, 8)
    teacher[0, 0, 0] = 100.0  # an outlier only the teacher has
    student = torch.zeros(1, 8, 8)
    assert feature_loss([student], [teacher], mask_massive=True) == 0
    assert feature_loss([student], [teacher], mask_massive=False) > 0


def test_feature_shape_mismatch_names_the_pair():
    with pytest.raises(ConfigError, match="student block 0 <-> teacher block 1"):
        feature_loss([torch.zeros(1, 4, 8)], [torch.zeros(1, 4, 16)], names=["student block 0 <-> teacher block 1"])
    with pytest.raises(ConfigError, match="same latent shape"):
        output_loss(torch.zeros(1, 4, 8, 8), torch.zeros(1, 8, 8, 8))


class _Joint(nn.Module):
    """A joint-attention block: returns ``(encoder_hidden_states, hidden_states)``."""

    def forward(self, hidden_states, encoder_hidden_states):
        return encoder_hidden_states + 1, hidden_states * 2


def test_capture_takes_the_image_stream_and_removes_hooks():
    model = nn.Module()
    model.blocks = nn.ModuleList([_Joint(), _Joint()])
    adapter = SimpleNamespace(block_stacks=(BlockStack("blocks", "n", returns=("encoder_hidden_states",
                                                                                "hidden_states")),))
    adapter.block_list = lambda m: [("blocks", i, b) for i, b in enumerate(m.blocks)]
    adapter.block_stack = lambda name: adapter.block_stacks[0]
    image, text = torch.ones(1, 2, 3), torch.zeros(1, 1, 3)
    with capture_features(model, adapter, [1]) as feats:
        model.blocks[1](image, text)
    assert torch.equal(feats[1], image * 2)
    with pytest.raises(RuntimeError), capture_features(model, adapter, [0, 1]):
        raise RuntimeError("boom")
    assert all(not block._forward_hooks for block in model.blocks)


def test_objectives_follow_the_reference_trainers():
    assert set(OBJECTIVES) >= {"epsilon", "flow"}
    assert isinstance(objective_for(DIT), EpsilonObjective)
    assert isinstance(objective_for(ADAPTERS.get("flux")), FlowObjective)
    x0 = torch.randn(4, 4, 8, 8)
    eps = objective_for(DIT)
    x_t, t, target = eps.noisy(x0, torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(3)
    noise = torch.randn(x0.shape, generator=gen)
    t_ref = torch.randint(0, 1000, (4,), generator=gen)
    assert torch.equal(t, t_ref) and torch.equal(target, noise)
    assert torch.equal(x_t, eps.scheduler.add_noise(x0, noise, t_ref))
    x_t, t, target = FlowObjective().noisy(x0, torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(3)
    noise, sigma = torch.randn(x0.shape, generator=gen), torch.rand(4, generator=gen)
    assert torch.equal(target, noise - x0) and torch.allclose(t, sigma * 1000)
    assert torch.allclose(x_t, (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * noise)


def test_v_objective_targets_alpha_noise_minus_sigma_x0_of_the_pipeline_scheduler():
    """CogVideoX (v-prediction, zero-terminal-SNR betas): ``x_t = alpha x0 + sigma noise``, target
    ``alpha noise - sigma x0`` with alpha^2 = the sampling scheduler's ``alphas_cumprod[t]``, sigma^2 = 1 - alpha^2."""
    adapter = ADAPTERS.get("cogvideox")
    sampler = adapter.scheduler(None)
    v = objective_for(adapter, dict(sampler.config))
    assert isinstance(v, VelocityObjective)
    x0 = torch.randn(4, 4, 2, 8, 8)
    x_t, t, target = v.noisy(x0, torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(5)
    noise = torch.randn(x0.shape, generator=gen)
    assert torch.equal(t, torch.randint(0, 1000, (4,), generator=gen))
    alpha_sq = sampler.alphas_cumprod[t].float().view(-1, 1, 1, 1, 1)
    alpha, sigma = alpha_sq.sqrt(), (1 - alpha_sq).sqrt()
    assert torch.allclose(target, alpha * noise - sigma * x0, atol=1e-5)
    assert torch.allclose(x_t, alpha * x0 + sigma * noise, atol=1e-5)
    assert not torch.allclose(target, noise, atol=0.1)  # not the epsilon target
    if (t == 999).any():  # zero terminal SNR: v = -x0 at the last timestep
        assert torch.allclose(target[t == 999], -x0[t == 999], atol=1e-5)

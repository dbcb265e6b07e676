"""Mixture of Blocks: routed shapes, exact dense equivalence with every block active, per-sample skipping, stock
reload, a short distillation with the group feature loss, bad configs."""

from __future__ import annotations

import copy

import pytest
import torch

import compressdit  # noqa: F401  (registers the diffusers backend that rebuilds routed blocks)
from compressdit.distill import DistillConfig, distill
from compressdit.distill.losses import resolve_layer_map
from compressdit.errors import CheckpointError, ConfigError
from compressdit.io.save import record_structure
from compressdit.io.structure import apply_structure
from compressdit.moe.blocks import activated_parameters, group_routers, routed_stacks
from compressdit.moe.mob import MoBConfig, mixture_of_blocks
from tests.conftest import tiny_dit
from tests.distill.test_distill_trainer import synthetic_data
from tests.moe.test_dense2moe import DIT, _batches, _predict


def _routed(layers: int = 4, **config):
    model = tiny_dit(layers=layers)
    dense = copy.deepcopy(model)
    mixture_of_blocks(model, DIT, MoBConfig.from_dict({"group": 2, "active": 1, **config}), _batches(model))
    return dense, model


def test_all_blocks_active_reproduce_the_dense_model_exactly() -> None:
    dense, model = _routed(group=2, active=2)
    assert torch.equal(_predict(model), _predict(dense))
    # stock names kept, one router per group added
    assert set(model.state_dict()) - set(dense.state_dict()) == {
        f"transformer_blocks.{i}.mob_router.{p}" for i in (0, 2) for p in ("weight", "bias")}


def test_routing_shapes_and_skipped_blocks_are_identity() -> None:
    dense, model = _routed()
    out = _predict(model)
    assert out.shape == _predict(dense).shape and not torch.equal(out, _predict(dense))
    routes = group_routers(model)
    assert list(routes) == ["transformer_blocks.0.mob_router", "transformer_blocks.2.mob_router"]
    for block in routes.values():
        assert block.route.keep.shape == (3, 2) and block.route.keep.sum(1).eq(1).all()
        assert block.route.logits.shape == (3, 2)
    # a block runs only for the samples routed to it (gathered), the others pass through unchanged
    block = routed_stacks(model)["transformer_blocks"][1]
    block.route.keep = torch.tensor([[True, False], [True, True], [False, True]])
    block.route.gates = block.route.keep.float()
    x = torch.randn(3, 16, 64)
    kwargs = {"timestep": torch.tensor([5, 500, 900]), "class_labels": torch.tensor([1, 2, 3])}
    with torch.no_grad():
        out = block(x, **kwargs)
        ref = dense.transformer_blocks[1](x[1:], timestep=kwargs["timestep"][1:], class_labels=kwargs["class_labels"][1:])
    assert torch.equal(out[0], x[0])
    torch.testing.assert_close(out[1:], ref, rtol=1e-5, atol=1e-5)
    assert activated_parameters(model) < 0.6 * sum(p.numel() for p in dense.parameters())


def test_per_sample_gather_matches_full_batch_masking() -> None:
    _, model = _routed()
    batch = _batches(model, 1, 6, 3)[0]
    with torch.no_grad():
        together = DIT.predict(model, batch.latents, batch.timestep, batch.cond)
        alone = torch.cat([DIT.predict(model, batch.latents[i:i + 1], batch.timestep[i:i + 1],
                                       type(batch.cond)({k: v[i:i + 1] for k, v in batch.cond.tensors.items()}))
                           for i in range(6)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


def test_stock_from_pretrained_rebuilds_routed_blocks(tmp_path) -> None:
    from diffusers import DiTTransformer2DModel

    _, model = _routed()
    structure = record_structure(model)
    assert structure["mob"] == {"transformer_blocks": {"blocks": 4, "group": 2, "active": 1, "features": 128}}
    model.save_pretrained(tmp_path / "a")
    reloaded = DiTTransformer2DModel.from_pretrained(tmp_path / "a")
    assert len(routed_stacks(reloaded)["transformer_blocks"]) == 4
    ours = model.state_dict()
    assert set(reloaded.state_dict()) == set(ours)
    assert all(torch.equal(t, ours[k]) for k, t in reloaded.state_dict().items())
    torch.testing.assert_close(_predict(reloaded), _predict(model), rtol=1e-5, atol=1e-5)
    reloaded.save_pretrained(tmp_path / "b")
    again = DiTTransformer2DModel.from_pretrained(tmp_path / "b")
    torch.testing.assert_close(_predict(again), _predict(model), rtol=1e-5, atol=1e-5)


def test_short_distillation_with_group_feature_loss_lowers_the_loss(tmp_path) -> None:
    dense, model = _routed()
    config = DistillConfig.from_dict({"steps": 6, "batch_size": 8, "lr": 3e-4, "warmup": 0, "ema_decay": None,
                                      "output_weight": 1.0, "data_weight": 0.0, "feature_weight": 0.1,
                                      "feature_schedule": "constant", "layer_map": "groups",
                                      "balance_weight": 0.01, "router_z_weight": 0.001})
    assert resolve_layer_map(DIT, model, dense, "groups") == [(1, 1), (3, 3)]
    metrics = distill(model, dense, DIT, config, tmp_path, synthetic_data(), quiet=True)
    history = metrics["history"]
    assert history[-1]["loss"] < 0.9 * history[0]["loss"], (history[0], history[-1])
    assert all(h["balance"] >= 0.99 and "feature" in h for h in history)
    assert metrics["expert_load"]["experts"] == 2 and 0 < metrics["expert_load"]["router_entropy"]
    router = group_routers(model)["transformer_blocks.0.mob_router"].mob_router
    fresh = group_routers(_routed()[1])["transformer_blocks.0.mob_router"].mob_router
    assert not torch.equal(router.weight, fresh.weight)  # the routers learned


def test_bad_configs_are_one_line_errors() -> None:
    with pytest.raises(ConfigError, match="active 3 exceeds group 2"):
        MoBConfig.from_dict({"group": 2, "active": 3})
    with pytest.raises(ConfigError, match="unknown key 'groups'"):
        MoBConfig.from_dict({"groups": 2})
    with pytest.raises(ConfigError, match="do not split; choose a group size that divides 4"):
        mixture_of_blocks(tiny_dit(layers=4), DIT, MoBConfig.from_dict({"group": 3, "active": 1}), [])
    with pytest.raises(ConfigError, match="already routed"):
        mixture_of_blocks(_routed()[1], DIT, MoBConfig(), [])
    with pytest.raises(ConfigError, match="layer_map 'groups' needs a student with routed blocks"):
        resolve_layer_map(DIT, tiny_dit(), tiny_dit(), "groups")
    with pytest.raises(CheckpointError, match="active 5 exceeds"):
        apply_structure(tiny_dit(layers=4), {"mob": {"transformer_blocks": {"blocks": 4, "group": 2, "active": 5,
                                                                            "features": 128}}})
    with pytest.raises(ConfigError) as exc:
        MoBConfig.from_dict({"group": 2, "active": 3})
    assert "\n" not in str(exc.value)

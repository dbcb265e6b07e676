"""Dense2MoE on a tiny DiT: exact dense equivalence with all experts active, the split, errors, stock reload."""

from __future__ import annotations

import copy

import pytest
import torch

import compressdit  # noqa: F401  (registers the diffusers backend that rebuilds MoE layers)
from compressdit.errors import ConfigError
from compressdit.io.save import record_structure
from compressdit.models import ADAPTERS
from compressdit.moe.dense2moe import Dense2MoEConfig, dense2moe
from compressdit.moe.layers import MoEFeedForward, moe_layers
from compressdit.prune.width import CalibrationBatch
from tests.conftest import tiny_dit

DIT = ADAPTERS.get("dit")


def _batches(model, count: int = 2, size: int = 4, seed: int = 0) -> list[CalibrationBatch]:
    gen = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    out = []
    for _ in range(count):
        x = torch.randn(size, *DIT.latent_shape(model), generator=gen, dtype=dtype)
        t = torch.randint(0, 1000, (size,), generator=gen)
        labels = torch.randint(0, 10, (size,), generator=gen).tolist()
        out.append(CalibrationBatch(x, t, DIT.encode(model, labels), torch.randn(x.shape, generator=gen, dtype=dtype)))
    return out


def _predict(model, seed: int = 5) -> torch.Tensor:
    batch = _batches(model, 1, 3, seed)[0]
    with torch.no_grad():
        return DIT.predict(model, batch.latents, batch.timestep, batch.cond)


def _convert(model, **config):
    return dense2moe(model, DIT, Dense2MoEConfig.from_dict(config), _batches(model))


@pytest.mark.parametrize("grouping", ["taylor", "coactivation"])
@pytest.mark.parametrize("experts, shared", [(7, 1), (8, 0)])
def test_all_experts_active_reproduce_the_dense_model(grouping: str, experts: int, shared: int) -> None:
    dense = tiny_dit().double()
    moe = copy.deepcopy(dense)
    layers = _convert(moe, experts=experts, shared_experts=shared, top_k=2, grouping=grouping)
    assert len(layers) == 2 and all(isinstance(b.ff, MoEFeedForward) for b in moe.transformer_blocks)
    assert (moe.transformer_blocks[0].ff.shared is None) == (shared == 0)
    for layer in layers.values():
        layer.top_k = experts
    torch.testing.assert_close(_predict(moe), _predict(dense), rtol=1e-10, atol=1e-10)
    for layer in layers.values():
        layer.top_k = 2
    assert (_predict(moe) - _predict(dense)).abs().max() > 1e-6  # top-2 of 8 is not the dense model


def test_split_is_a_balanced_partition_and_router_starts_at_centroids() -> None:
    model = tiny_dit().double()
    ff = model.transformer_blocks[0].ff
    w1 = ff.net[0].proj.weight.detach().clone()
    layer = _convert(model, experts=7, shared_experts=1, top_k=3)["transformer_blocks.0.ff"]
    rows = [e.up.weight for e in layer.experts] + [layer.shared.up.weight]
    assert all(len(r) == 32 for r in rows)
    stacked = torch.cat(rows)
    order = torch.cat([torch.nonzero((w1 == row).all(1)).flatten() for row in stacked])
    assert sorted(order.tolist()) == list(range(256))  # every neuron exactly once
    torch.testing.assert_close(layer.router.weight[0], layer.experts[0].up.weight.mean(0))


def test_bad_configs_are_one_line_errors() -> None:
    with pytest.raises(ConfigError, match="top_k 9 exceeds experts 8") as info:
        Dense2MoEConfig.from_dict({"experts": 8, "shared_experts": 0, "top_k": 9}, "moe")
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="256 hidden neurons, which experts \\+ shared_experts = 5 does not divide"):
        _convert(tiny_dit(), experts=4, shared_experts=1, top_k=2)
    with pytest.raises(ConfigError, match="grouping"):
        Dense2MoEConfig.from_dict({"grouping": "random"}, "moe")


def test_stock_from_pretrained_rebuilds_and_save_pretrained_round_trips(tmp_path) -> None:
    from diffusers import DiTTransformer2DModel

    model = tiny_dit()
    _convert(model, experts=7, shared_experts=1, top_k=3, grouping="coactivation")
    structure = record_structure(model)
    assert structure["moe"]["transformer_blocks.1.ff"]["experts"] == 7
    model.save_pretrained(tmp_path / "a")
    reloaded = DiTTransformer2DModel.from_pretrained(tmp_path / "a")
    assert set(moe_layers(reloaded)) == {"transformer_blocks.0.ff", "transformer_blocks.1.ff"}
    assert set(reloaded.state_dict()) == set(model.state_dict())
    assert "transformer_blocks.0.ff.experts.6.down.weight" in reloaded.state_dict()
    ours = model.state_dict()
    assert all(torch.equal(t, ours[k]) for k, t in reloaded.state_dict().items())
    # equal tensors; outputs equal up to BLAS summation order (safetensors' memory-mapped tensors are not
    # 64-byte aligned, so the kernels may differ)
    torch.testing.assert_close(_predict(reloaded), _predict(model), rtol=1e-5, atol=1e-5)
    reloaded.save_pretrained(tmp_path / "b")
    again = DiTTransformer2DModel.from_pretrained(tmp_path / "b")
    assert all(torch.equal(t, ours[k]) for k, t in again.state_dict().items())
    torch.testing.assert_close(_predict(again), _predict(model), rtol=1e-5, atol=1e-5)


def _flux_case():
    from compressdit.models.text_conditions import synthetic_text
    from tests.conftest import tiny_flux

    flux = ADAPTERS.get("flux")
    dense = tiny_flux(double=1, single=2, heads=2, text_dim=32, pooled_dim=16).double()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, *flux.latent_shape(dense), generator=gen, dtype=torch.float64)
    cond = flux.encode(dense, synthetic_text(2, 5, 32, 16)).to(torch.device("cpu"), torch.float64)
    batch = CalibrationBatch(x, torch.tensor([300, 700]), cond, torch.randn(x.shape, generator=gen, dtype=torch.float64))
    return flux, dense, x, cond, batch


@pytest.mark.parametrize("grouping", ["coactivation", "taylor"])
def test_flux_double_and_single_blocks_split_exactly(grouping: str) -> None:
    """Both streams' FFNs of the double blocks and the parallel MLPs of the single blocks (proj_mlp -> MoE,
    act_mlp -> identity, proj_out -> TailSum of the attention columns); all experts active = the dense model."""
    from compressdit.moe.layers import TailSum

    flux, dense, x, cond, batch = _flux_case()
    moe = copy.deepcopy(dense)
    config = Dense2MoEConfig.from_dict({"experts": 3, "shared_experts": 1, "top_k": 1, "grouping": grouping})
    layers = dense2moe(moe, flux, config, [batch])
    assert sorted(layers) == ["single_transformer_blocks.0.proj_mlp", "single_transformer_blocks.1.proj_mlp",
                              "transformer_blocks.0.ff", "transformer_blocks.0.ff_context"]
    single = moe.single_transformer_blocks[1]
    assert type(single.act_mlp) is torch.nn.Identity and type(single.proj_out) is TailSum
    hidden = dense.single_transformer_blocks[1].proj_mlp.out_features
    dim = single.proj_out.out_features
    assert single.proj_out.proj.weight.shape == (dim, dim) and single.proj_mlp.layout.dim_out == dim
    assert sum(len(e.up.weight) for e in single.proj_mlp.experts) + len(single.proj_mlp.shared.up.weight) == hidden
    assert flux.role_of("transformer_blocks.0.ff_context.experts.2.up") == "context"
    assert flux.role_of("transformer_blocks.0.ff.shared.down") == "ffn_down"
    assert flux.role_of("single_transformer_blocks.1.proj_mlp.experts.0.up") == "ffn_up"
    assert flux.role_of("single_transformer_blocks.1.proj_mlp.shared.down") == "ffn_down"
    assert flux.role_of("single_transformer_blocks.1.proj_out.proj") == "attn_out"
    with torch.no_grad():
        t = torch.tensor([500])
        assert not torch.allclose(flux.predict(moe, x, t, cond), flux.predict(dense, x, t, cond), atol=1e-6)
        for layer in layers.values():
            layer.top_k = 3
        torch.testing.assert_close(flux.predict(moe, x, t, cond), flux.predict(dense, x, t, cond), rtol=1e-10,
                                   atol=1e-10)


def test_flux_single_block_moe_reloads_through_stock_from_pretrained(tmp_path) -> None:
    from diffusers import FluxTransformer2DModel

    flux, dense, x, cond, batch = _flux_case()
    config = Dense2MoEConfig.from_dict({"experts": 3, "shared_experts": 1, "top_k": 2, "grouping": "coactivation"})
    dense2moe(dense, flux, config, [batch])
    structure = record_structure(dense)
    assert structure["tail_sum"] == {f"single_transformer_blocks.{i}.proj_out": 32 for i in range(2)}
    assert structure["identity"] == [f"single_transformer_blocks.{i}.act_mlp" for i in range(2)]
    dense.save_pretrained(tmp_path)
    reloaded = FluxTransformer2DModel.from_pretrained(tmp_path, torch_dtype=torch.float64)
    assert reloaded.state_dict().keys() == dense.state_dict().keys()
    with torch.no_grad():
        t = torch.tensor([500])
        torch.testing.assert_close(flux.predict(reloaded, x, t, cond), flux.predict(dense, x, t, cond))


def test_quantized_experts_reload_through_stock_from_pretrained(tmp_path) -> None:
    from diffusers import DiTTransformer2DModel

    from compressdit.io.diffusers_quantizer import attach_quantizer
    from compressdit.quant.layers import QuantizedLinear
    from compressdit.quant.spec import LinearQuantSpec
    from compressdit.quant.transform import quantize_layers

    model = tiny_dit()
    _convert(model, experts=7, shared_experts=1, top_k=3, grouping="coactivation")
    record_structure(model)
    specs = {n: LinearQuantSpec(w_bits=8, a_bits=8) for n, m in model.named_modules()
             if DIT.role_of(n) in ("ffn_up", "ffn_down")}
    assert len(specs) == 2 * 2 * 8  # up and down of 7 routed + 1 shared expert in 2 blocks
    quantize_layers(model, specs)
    attach_quantizer(model, specs)
    model.save_pretrained(tmp_path)
    reloaded = DiTTransformer2DModel.from_pretrained(tmp_path)
    assert isinstance(reloaded.transformer_blocks[1].ff.experts[3].down, QuantizedLinear)
    assert type(reloaded.transformer_blocks[1].ff.router) is torch.nn.Linear
    torch.testing.assert_close(_predict(reloaded), _predict(model), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("structure, message", [
    ({"tail_sum": {"single_transformer_blocks.0.proj_out": 200}}, "must be a head width below the input width"),
    ({"tail_sum": {"single_transformer_blocks.0.proj_mlp": "32"}}, "must be a head width below the input width"),
    ({"tail_sum": {"single_transformer_blocks.9.proj_out": 32}}, "does not have"),
    ({"identity": "single_transformer_blocks.0.act_mlp"}, "must list module names"),
    ({"identity": ["single_transformer_blocks.0.act_nope"]}, "does not have"),
])
def test_bad_parallel_mlp_manifests_are_one_line_errors(structure: dict, message: str) -> None:
    from compressdit.errors import CheckpointError
    from compressdit.io.structure import apply_structure
    from tests.conftest import tiny_flux

    with pytest.raises(CheckpointError, match=message) as info:
        apply_structure(tiny_flux(double=1, single=1, heads=2, text_dim=32, pooled_dim=16), structure)
    assert "\n" not in str(info.value)

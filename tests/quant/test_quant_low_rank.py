"""SVDQuant's low-rank branch: SVD factors, the refined split, QuantLinear with ``low_rank``, specs, reload."""

from __future__ import annotations

import pytest
import torch
from diffusers import DiTTransformer2DModel

from compressdit.errors import ConfigError
from compressdit.models import adapter_for
from compressdit.quant.layers import QuantLinear
from compressdit.quant.low_rank import low_rank_split, svd_factors
from compressdit.quant.primitives import quantize_weight_rtn
from compressdit.quant.spec import LinearQuantSpec
from compressdit.quant.transform import LayerRule, resolve_plan
from tests.conftest import tiny_dit
from tests.io.test_diffusers_quantizer import _dit_inputs, _quantize, _run


def _outlier_linear(seed: int = 0, in_features: int = 256, out_features: int = 128) -> torch.nn.Linear:
    """A layer whose few input channels carry 20x larger weights (what smoothing leaves behind)."""
    torch.manual_seed(seed)
    linear = torch.nn.Linear(in_features, out_features)
    with torch.no_grad():
        linear.weight[:, :4] *= 20
    return linear


def _w4(weight: torch.Tensor) -> torch.Tensor:
    return quantize_weight_rtn(weight, 4, 64).dequantized()


def test_svd_factors_are_the_truncated_svd_and_exact_at_full_rank():
    weight = torch.randn(48, 32, generator=torch.Generator().manual_seed(1))
    up, down = svd_factors(weight, 32)
    torch.testing.assert_close(up @ down, weight, rtol=1e-4, atol=1e-4)
    s = torch.linalg.svdvals(weight)
    for rank in (4, 8):
        up, down = svd_factors(weight, rank)
        assert up.shape == (48, rank) and down.shape == (rank, 32)
        assert abs(float((weight - up @ down).norm()) - float(s[rank:].norm())) < 1e-3  # Eckart-Young
    big = torch.randn(600, 400, generator=torch.Generator().manual_seed(2))  # randomized SVD path
    up, down = svd_factors(big, 16)
    assert float((big - up @ down).norm()) < 1.02 * float(torch.linalg.svdvals(big)[16:].norm())
    with pytest.raises(ValueError, match="rank 33"):
        svd_factors(weight, 33)


def test_refined_split_beats_plain_rtn_and_never_gets_worse_than_its_first_step():
    weight = _outlier_linear().weight.detach()
    plain = float((weight - _w4(weight)).norm() / weight.norm())
    first = low_rank_split(weight, 16, _w4, iterations=1)
    refined = low_rank_split(weight, 16, _w4)
    assert refined.error <= first.error < plain / 3
    residual = weight - refined.up @ refined.down
    assert abs(float((residual - _w4(residual)).norm() / weight.norm()) - refined.error) < 1e-5


def test_full_rank_branch_reconstructs_the_layer():
    linear = _outlier_linear(in_features=64, out_features=32)
    layer = QuantLinear.from_linear(linear, LinearQuantSpec(w_bits=4, group_size=32, low_rank=32))
    x = torch.randn(5, 64)
    with torch.no_grad():
        torch.testing.assert_close(layer.reference_forward(x), linear(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(layer.effective_weight(), linear.weight, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("spec,gain", [(LinearQuantSpec(w_bits=4, group_size=64, low_rank=16), 0.5),
                                       (LinearQuantSpec(w_bits=4, a_bits=4, group_size=64, low_rank=16), 0.5),
                                       # W8A8: activation rounding dominates; the branch still must not hurt
                                       (LinearQuantSpec(w_bits=8, a_bits=8, low_rank=8, balance=0.5), 1.0)])
def test_kernels_add_the_branch_like_the_reference(spec, gain):
    linear = _outlier_linear()
    absmax = torch.rand(256) * 4 + 0.1
    layer = QuantLinear.from_linear(linear, spec, absmax)
    plain = QuantLinear.from_linear(linear, LinearQuantSpec(**{**spec.to_dict(), "low_rank": None}), absmax)
    x = torch.randn(2, 7, 256)
    with torch.no_grad():
        out, truth, y = layer(x), layer.reference_forward(x), linear(x)
        assert layer.kernel_name != "reference"
        assert float((out - truth).norm() / truth.norm()) < 1e-2  # bf16 / int8 kernels vs the fp32 reference
        assert float((out - y).norm()) < gain * float((plain(x) - y).norm())


def test_bad_low_rank_specs_are_one_line_errors():
    with pytest.raises(ConfigError, match="low_rank: the branch's rank must be positive"):
        LinearQuantSpec.from_dict({"w_bits": 4, "low_rank": 0}, "spec")
    with pytest.raises(ConfigError, match="format 'vq' is weight-only"):
        LinearQuantSpec.from_dict({"format": "vq", "w_bits": 3, "low_rank": 8}, "spec")
    with pytest.raises(ConfigError, match="format 'fp8'.*low_rank"):
        LinearQuantSpec.from_dict({"format": "fp8", "w_bits": 8, "low_rank": 8}, "spec")
    model = tiny_dit()
    plan = resolve_plan(model, adapter_for(model), [LayerRule("re:.*", LinearQuantSpec(w_bits=4, low_rank=4096))])
    from compressdit.quant.transform import quantize_layers

    with pytest.raises(ConfigError, match="low_rank 4096 is larger than the layer"):
        quantize_layers(model, plan)


def test_low_rank_checkpoint_reloads_through_stock_diffusers(tmp_path):
    spec = LinearQuantSpec(w_bits=4, a_bits=8, group_size=32, low_rank=8)
    model = _quantize(tiny_dit(), [LayerRule("role:embedder", None), LayerRule("role:head", None),
                                   LayerRule("re:.*", spec)])
    expected = _run(model, _dit_inputs())
    model.save_pretrained(tmp_path / "m")
    reloaded = DiTTransformer2DModel.from_pretrained(tmp_path / "m")
    layers = [m for m in reloaded.modules() if isinstance(m, QuantLinear)]
    assert layers and all(m.spec.low_rank == 8 and m.low_rank_up.shape[1] == 8 for m in layers)
    assert torch.equal(_run(reloaded, _dit_inputs()), expected)

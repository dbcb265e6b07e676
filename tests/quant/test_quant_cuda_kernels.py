"""The CUDA kernels in the registry: device-free choice, prepack contract on CPU, and (on a GPU) the models."""

from __future__ import annotations

import pytest
import torch

from compressdit.models import adapter_for
from compressdit.quant import cuda_kernels
from compressdit.quant.cpu_dense import fp8_kernel_name
from compressdit.quant.cuda_kernels import cuda_kernel_name
from compressdit.quant.formats import FORMATS
from compressdit.quant.kernel_registry import KERNELS, REFERENCE, cache_of, prepack_model, select_kernel
from compressdit.quant.spec import LinearQuantSpec
from compressdit.quant.transform import quantize_layers, quantized_modules, resolve_plan
from compressdit.recipe import load_recipe
from tests.conftest import tiny_dit

W8A8 = LinearQuantSpec(w_bits=8, a_bits=8)
W8A8_TENSOR = LinearQuantSpec(w_bits=8, a_bits=8, a_granularity="per_tensor")
FP8 = LinearQuantSpec(format="fp8", w_bits=8, a_bits=8)
W4A16 = LinearQuantSpec(w_bits=4, group_size=64)
CASES = [(W8A8, "cuda-w8a8-int8"), (W8A8_TENSOR, "cuda-w8a8-int8"), (FP8, "cuda-fp8"),
         (W4A16, "cuda-int4-weight"), (LinearQuantSpec(w_bits=4, group_size=128, w_symmetric=False),
                                       "cuda-int4-weight")]


@pytest.mark.parametrize("spec,name", CASES, ids=lambda v: getattr(v, "label", str(v)))
def test_cuda_kernel_choice_is_device_free(spec, name):
    assert cuda_kernel_name(spec, (64, 256), (9, 0)) == name


def test_no_cuda_kernel_for_what_the_kernels_do_not_cover():
    assert cuda_kernel_name(FP8, (64, 256), (8, 0)) is None  # _scaled_mm E4M3 needs 8.9
    assert cuda_kernel_name(W4A16, (64, 256), (7, 5)) is None  # tinygemm needs 8.0
    assert cuda_kernel_name(LinearQuantSpec(w_bits=8, a_bits=8, group_size=64), (64, 256), (9, 0)) is None
    assert cuda_kernel_name(LinearQuantSpec(w_bits=4, a_bits=8), (64, 256), (9, 0)) is None
    assert cuda_kernel_name(W8A8, (64, 252), (9, 0)) is None
    assert cuda_kernel_name(LinearQuantSpec(format="vq", w_bits=3), (64, 256), (9, 0)) is None


def test_registry_picks_cuda_kernels_for_cuda_devices_and_keeps_cpu_choices(monkeypatch):
    cuda = torch.device("cuda", 0)
    assert cuda_kernels.cuda_capability(torch.device("cpu")) is None
    if not torch.cuda.is_available():
        assert select_kernel(W8A8, cuda, (64, 256)) == REFERENCE
    monkeypatch.setattr(cuda_kernels, "cuda_capability", lambda device: (9, 0) if device.type == "cuda" else None)
    for spec, name in CASES:
        assert select_kernel(spec, cuda, (64, 256)) == name
    assert select_kernel(W8A8, torch.device("cpu"), (64, 256)) == "cpu-int8-gemm"
    assert select_kernel(W4A16, torch.device("cpu"), (4096, 256)) == "cpu-int4-weight"
    assert select_kernel(FP8, torch.device("cpu"), (64, 256)) == fp8_kernel_name(8, (64, 256))
    monkeypatch.setattr(cuda_kernels, "cuda_capability", lambda device: (8, 6) if device.type == "cuda" else None)
    assert select_kernel(FP8, cuda, (64, 256)) == REFERENCE


@pytest.mark.parametrize("spec,name", CASES, ids=lambda v: getattr(v, "label", str(v)))
def test_prepack_then_run_is_the_reference_on_cpu(spec, name):
    """The contract on CPU, where the ops run their references: prepack(layer) once, run(layer, x, buffers)."""
    torch.manual_seed(0)
    layer = FORMATS.get(spec.format).quantize(torch.nn.Linear(256, 64), spec, None)
    kernel = KERNELS.get(name)
    buffers = kernel.prepack(layer)
    assert not set(buffers) & set(layer.state_dict())  # runtime only, never saved
    x = torch.randn(2, 17, 256)
    with torch.no_grad():
        out, truth = kernel.run(layer, x, buffers), layer.reference_forward(x)
    assert out.shape == truth.shape and out.dtype == x.dtype
    error = ((out - truth).norm() / truth.norm()).item()
    assert error < (1e-2 if spec.w_bits == 4 else 1e-5)  # tinygemm: bf16 activations and scales


def _quantized_dit(recipe: str):
    model = tiny_dit()
    plan = resolve_plan(model, adapter_for(model), load_recipe(recipe).stages[0].config.options.rules)
    quantize_layers(model, plan)
    return model


def _dit_inputs(device="cpu"):
    gen = torch.Generator().manual_seed(0)
    return {"hidden_states": torch.randn(2, 4, 8, 8, generator=gen).to(device),
            "timestep": torch.tensor([10, 500], device=device), "class_labels": torch.tensor([1, 7], device=device)}


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("recipe,name,bound", [("rtn-w8a8", "cuda-w8a8-int8", 3e-2), ("fp8", "cuda-fp8", 5e-2),
                                               ("rtn-w4a16", "cuda-int4-weight", 3e-2)])
def test_quantized_dit_on_cuda_runs_the_registered_kernel(recipe, name, bound):
    if recipe == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("E4M3 _scaled_mm needs compute capability 8.9")
    model = _quantized_dit(recipe)
    with torch.no_grad():
        truth = model(**_dit_inputs(), return_dict=False)[0]  # CPU: float activations, reference/CPU kernels
        model = model.to("cuda")
        layers = quantized_modules(model)
        assert layers and all(layer.kernel_name == name for layer in layers.values())
        assert set(prepack_model(model).values()) == {name}
        assert all(cache_of(layer).buffers for layer in layers.values())
        out = model(**_dit_inputs("cuda"), return_dict=False)[0]
        # aot_eager: dynamo + the ops' fake impls through the registry in seconds (inductor on these ops:
        # test_quant_gpu_ops.py::test_cuda_compiled_model_equals_eager and bench/gpu_e2e.py --compile)
        compiled = torch.compile(model, backend="aot_eager")(**_dit_inputs("cuda"), return_dict=False)[0]
    # per layer the ops are within 1e-2 of their references (test_quant_gpu_ops.py); two blocks compound it.
    # fp8: the CUDA path accumulates with _scaled_mm's fast accumulation in bf16 output (H200: 3.3e-2 measured)
    # compiled: the row quantization is traced (not the op's Triton quantizer): e4m3 codes one step apart at
    # rounding ties flip a few outputs of the tiny model by more than an elementwise bound, so compare norms
    for name_, result in (("eager", out), ("compiled", compiled)):
        error = ((result.cpu() - truth).norm() / truth.norm()).item()
        assert error < bound, f"{recipe} {name_}: relative error {error:.4f} against the CPU path"
    assert ((compiled - out).norm() / out.norm()).item() < bound


def test_forced_cuda_kernels_trace_into_one_graph_on_cpu():
    """``set_kernel`` runs the CUDA kernels' wiring on CPU (their ops' references): dynamo traces it whole."""
    from compressdit.quant.kernel_registry import set_kernel

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[FORMATS.get(s.format).quantize(torch.nn.Linear(256, 256), s, None)
                                  for s, _ in CASES], torch.nn.GELU())
    for layer, (_, name) in zip(model, CASES):
        set_kernel(layer, name)
        assert layer.kernel_name == name
    x = torch.randn(3, 20, 256)
    with torch.no_grad():
        eager = model(x)
        assert all(cache_of(layer).name == name for layer, (_, name) in zip(model, CASES))
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(compiled, eager)

"""A layer's prepacked kernel is rebuilt exactly when what its prepack read changed (``kernel_registry.StateKey``);
every kernel family under autocast, gradients, empty and non-finite inputs as the reference."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

from compressdit.quant.format_registry import FORMATS
from compressdit.quant.kernel_registry import cache_of, set_kernel
from compressdit.quant.layers import QuantLinear, QuantState
from compressdit.quant.spec import LinearQuantSpec
from tests.conftest import torch_threads
from tests.quant.test_quant_cpu_kernels import _layer as groups_layer


def _layer(seed: int = 0) -> QuantLinear:
    torch.manual_seed(seed)
    spec = LinearQuantSpec(w_bits=8, a_bits=8, balance=0.5)
    return QuantLinear.from_linear(torch.nn.Linear(64, 48), spec, input_absmax=torch.rand(64) * 4 + 0.1)


def _scale_in_place(layer):
    layer.weight_scale.mul_(2)


def _swap_storage(layer):  # .data = keeps the object and its version counter: only the storage tells
    layer.smooth_scale.data = layer.smooth_scale.data * 2


def _bias_in_place(layer):
    layer.bias.add_(1)


def _replace_object(layer):  # what accelerate's set_module_tensor_to_device does
    layer._parameters["weight_scale"] = QuantState(layer.weight_scale.data * 3)


def _load_state_dict(layer):
    layer.load_state_dict(_layer(seed=1).state_dict())


def _codes_in_place(layer):  # (writes through .data are invisible: .data has a version counter of its own)
    layer.weight[:, :3] = 0


@pytest.mark.parametrize("change", [_scale_in_place, _swap_storage, _bias_in_place, _replace_object,
                                    _load_state_dict, _codes_in_place])
def test_a_changed_saved_tensor_rebuilds_the_prepack(change):
    layer, x = _layer(), torch.randn(3, 5, 64)
    with torch.no_grad():
        layer(x)
        key = cache_of(layer).key
        layer(x)
        assert cache_of(layer).key is key  # nothing changed: no rebuild
        change(layer)
        out = layer(x)
        assert cache_of(layer).key is not key
        reference = layer.reference_forward(x)
    assert ((out - reference).norm() / reference.norm()).item() <= 1e-5


@pytest.mark.parametrize("recipe", ["svdquant-w4a4", "svdquant-nvfp4"])
def test_a_low_rank_factor_written_in_place_rebuilds_the_prepack(recipe):
    """SVDQuant's branch factors are float parameters outside the saved codes (an optimizer step writes them in place):
    the prepack that holds their copies is rebuilt too."""
    layer = groups_layer(recipe, 64, 128)
    x = torch.randn(2, 8, 128)
    with torch.no_grad():
        layer(x)
        key = cache_of(layer).key
        for factor in (layer.low_rank_up, layer.low_rank_down):
            factor.mul_(2)
            out = layer(x)
            assert cache_of(layer).key is not key
            key = cache_of(layer).key
            reference = layer.reference_forward(x)
            assert ((out - reference).norm() / reference.norm()).item() <= 1e-5


def test_a_new_thread_count_or_a_registered_tensor_rebuilds_the_prepack():
    layer, x = _layer(), torch.randn(4, 64)
    threads = torch.get_num_threads()
    with torch.no_grad():
        layer(x)
        key = cache_of(layer).key
        try:
            torch.set_num_threads(threads + 1)
            layer(x)
        finally:
            torch.set_num_threads(threads)
        assert cache_of(layer).key is not key
        key = cache_of(layer).key
        layer.input_scale = QuantState(torch.ones(()))  # None before: now a registered parameter
        layer(x)
        assert cache_of(layer).key is not key


def test_the_key_holds_the_prepacked_storage_so_its_address_cannot_come_back():
    layer = _layer()
    with torch.no_grad():
        layer(torch.randn(2, 64))
    prepacked = layer.weight_scale.data_ptr()
    for _ in range(3):  # a freed storage's address is often reused by the next allocation of its size
        layer.weight_scale.data = layer.weight_scale.data.clone()
    assert layer.weight_scale.data_ptr() != prepacked
    assert not cache_of(layer).key.holds_for(layer)


def _recipe_layer(recipe: str, **changes) -> nn.Module:
    """A 128 -> 96 layer with the spec a shipped recipe gives a transformer block's linears (with ``changes``), nearest
    rounding (no Hessian here), balanced on random statistics."""
    from compressdit.recipe import load_recipe

    stage = next(s for s in load_recipe(recipe).stages if s.name == "quantize")
    spec = [rule.spec for rule in stage.config.options.rules if rule.spec is not None][-1]
    spec = dataclasses.replace(spec, rounding="rtn", **changes)
    torch.manual_seed(0)
    return FORMATS.get(spec.format).quantize(torch.nn.Linear(128, 96), spec, torch.rand(128) * 4 + 0.1)


def _on_reference(layer: nn.Module) -> nn.Module:
    reference = copy.deepcopy(layer)
    set_kernel(reference, "reference")
    return reference


#: a block linear of every kind of shipped recipe (each CPU kernel family)
RECIPES = ["rtn-w8a8", "w8a8", "w4a16", "w4a8", "rtn-w4a4", "nvfp4", "mxfp4", "svdquant-w4a4", "svdquant-nvfp4",
           "lrq-w4a4", "vq-w3", "fp8"]


@pytest.mark.parametrize("recipe", RECIPES)
def test_kernels_and_their_prepacks_ignore_autocast(recipe):
    """Under ``torch.autocast`` a layer's kernel computes as without it: torch's matmuls inside a kernel came back in
    autocast's dtype, which its C code read as fp32 (SVDQuant's branch: NaN under bf16 autocast), and a prepack
    built under autocast kept weights rounded to its dtype."""
    layer = _recipe_layer(recipe)
    x = torch.randn(2, 9, 128) * torch.linspace(0.2, 3, 128)
    with torch.no_grad():
        later = copy.deepcopy(layer)  # its prepack built under autocast
        expected = {dtype: layer(x.to(dtype)) for dtype in (torch.float32, torch.bfloat16)}
        for dtype in (torch.bfloat16, torch.float16):
            with torch.autocast("cpu", dtype=dtype):
                for x_dtype, out in expected.items():
                    assert torch.equal(later(x.to(x_dtype)), out), (dtype, x_dtype)
        assert torch.equal(later(x), expected[torch.float32])
    assert cache_of(later).name == cache_of(layer).name


@pytest.mark.parametrize("recipe", RECIPES)
def test_no_rows_and_nan_rows_as_the_reference(recipe):
    """An input of no rows gives the empty output (w4a8 raised a misleading "library not loaded", NVFP4's tensor
    scale an amax error); a NaN in a row gives NaN where the reference does (W8A8's row scale dropped it: finite
    outputs from a NaN input) and the reference's numbers elsewhere; an inf, non-finite outputs where it does."""
    layer = _recipe_layer(recipe)
    reference = _on_reference(layer)
    x = torch.randn(2, 3, 128)
    x[0, 1, 5] = float("nan")
    with torch.no_grad():
        for empty in (torch.randn(0, 128), torch.randn(2, 0, 128)):
            out = layer(empty)
            assert out.shape == (*empty.shape[:-1], 96) and out.dtype == empty.dtype
        out, expected = layer(x), reference(x)
        assert torch.equal(torch.isfinite(out), torch.isfinite(expected)) and not torch.isfinite(expected).all()
        finite = torch.isfinite(expected)
        assert ((out[finite] - expected[finite]).norm() / expected[finite].norm()) < 0.02
        x[0, 1, 5], x[1, 2, 7] = 1.0, float("inf")  # (MXFP4 clamped an inf to its grid's end: finite outputs)
        assert torch.equal(torch.isfinite(layer(x)), torch.isfinite(reference(x)))


@pytest.mark.parametrize("recipe", ["rtn-w8a8", "w4a16", "w4a8", "nvfp4", "svdquant-w4a4", "lrq-w4a4", "vq-w3", "fp8"])
def test_gradients_to_the_input_come_from_the_reference_while_the_kernel_runs_forward(recipe):
    """Grad mode on and an input that requires grad (an adapter upstream): the kernel's output (not the dequantize
    reference's: it ran every such call before), the reference's gradient to the input; where a tensor of the
    layer itself trains, the reference forward, so that it gets its gradient."""
    layer = _recipe_layer(recipe)
    reference = _on_reference(layer)
    x, grad = torch.randn(2, 5, 128), torch.randn(2, 5, 96)
    with torch.no_grad():
        kernel_out = layer(x)
    ours, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = layer(ours)
    assert torch.equal(out, kernel_out) and out.requires_grad
    out.backward(grad)
    reference(theirs).backward(grad)
    assert torch.equal(ours.grad, theirs.grad)
    layer.bias.requires_grad_(True)
    assert torch.equal(layer(x.clone().requires_grad_()), reference(x))
    # a tensor of the layer trains, the input needs no gradient: the reference, whose gradient the bias gets (the
    # kernel ran such calls, the bias got none)
    reference.bias.requires_grad_(True)
    out = layer(x)
    assert out.requires_grad and torch.equal(out, reference(x))
    out.backward(grad)
    reference(x).backward(grad)
    assert layer.bias.grad is not None and torch.equal(layer.bias.grad, reference.bias.grad)
    with torch.no_grad():
        assert torch.equal(layer(x), kernel_out)  # no gradient to keep: the kernel again


@pytest.mark.parametrize("recipe", ["svdquant-w4a4", "w4a16"])
def test_compiled_layers_ignore_autocast_too(recipe):
    """Under ``torch.compile(fullgraph=True)`` the autocast checks are traced (guards), and the kernel's call lands in
    an autocast-free region: the eager output without autocast, bit for bit."""
    layer = _recipe_layer(recipe)
    x = torch.randn(2, 9, 128)
    with torch.no_grad():
        expected = layer(x)
        compiled = torch.compile(layer, fullgraph=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(compiled(x), expected)
        assert torch.equal(compiled(x), expected)


#: kernels with a direct run (``Kernel.direct``) and the shipped recipes whose block linears may run them (on CPUs with
#: bf16 GEMMs or AMX, others run: the test then checks the numbers alone)
DIRECT_KERNELS = {"cpu-twinlog-dense", "cpu-int-dense-fp32", "cpu-vq-dense", "cpu-fp8-dense"}


def _with_usual_path(layer: nn.Module, x: torch.Tensor) -> nn.Module:
    """A copy of ``layer``, prepacked on ``x``, whose direct run is dropped: its forward takes the registry's path."""
    usual = copy.deepcopy(layer)
    with torch.no_grad():
        usual(x)
    cache_of(usual).direct = None  # (its key still holds: never rebuilt)
    return usual


def _counting_direct(layer: nn.Module) -> list:
    """The calls of ``layer``'s direct run that gave an output, counted from now on (``[]`` where it has none)."""
    cache, calls = cache_of(layer), []
    direct = cache.direct
    if direct is not None:
        def counted(layer, x):
            out = direct(layer, x)
            calls.extend([] if out is None else [x.shape])
            return out

        cache.direct = counted
    return calls


@pytest.mark.parametrize("recipe,rotation", [("lrq-w4a4", "hadamard"), ("lrq-w4a4", "duquant"), ("w4a16", None),
                                             ("rtn-w4a16", None), ("vq-w3", None), ("fp8", None), ("rtn-w8a8", None)])
def test_the_direct_run_is_the_usual_path_bit_for_bit(recipe, rotation):
    """Once prepacked, a layer whose kernel has a direct run calls it from ``forward`` before any of the registry's
    Python: the usual path's numbers bit for bit on 2-D and 3-D rows; inputs it does not take (bf16, a strided view,
    no rows) and calls that keep a gradient go the usual way; kernels without one (W8A8's) have none."""
    # (LRQ's rotation is chosen per layer by its calibration)
    layer = _recipe_layer(recipe, **({} if rotation is None else {"rotation": rotation}))
    x = torch.randn(2, 9, 128) * torch.linspace(0.2, 3, 128)
    usual = _with_usual_path(layer, x)
    with torch.no_grad():
        first = layer(x)  # the prepack: the usual path
        calls = _counting_direct(layer)
        name = cache_of(layer).name
        expects_direct = name in DIRECT_KERNELS and recipe != "rtn-w8a8"
        assert (cache_of(layer).direct is not None) == expects_direct, name
        inputs = [x, x[0], x[:1, :1], x.to(torch.bfloat16), x.transpose(0, 1), torch.randn(0, 128)]
        for rows in inputs:
            assert torch.equal(layer(rows), usual(rows)), (name, rows.shape, rows.dtype)
        assert torch.equal(layer(x), first)
    if expects_direct:  # the weight-only runs (nn.Linear's call) take the strided view, FP8's no rows too; none bf16
        more = {"cpu-int-dense-fp32": [(9, 2, 128), (0, 128)], "cpu-vq-dense": [(9, 2, 128), (0, 128)],
                "cpu-fp8-dense": [(0, 128)]}.get(name, [])
        assert calls == [x.shape, x[0].shape, x[:1, :1].shape, *more, x.shape], (name, calls)
    x_grad = x.clone().requires_grad_()
    calls.clear()
    assert torch.equal(layer(x_grad), first) and not calls  # the kernel's output with the reference's gradient


@pytest.mark.parametrize("recipe,rotation", [("lrq-w4a4", "hadamard"), ("lrq-w4a4", "duquant"), ("w4a16", None),
                                             ("vq-w3", None), ("fp8", None)])
@pytest.mark.parametrize("change", ["bias in place", "smooth storage", "object", "threads", "rotation in place"])
def test_the_direct_run_never_reads_a_stale_prepack(recipe, rotation, change):
    """What the key sees (in-place writes, a storage swapped under ``.data``, a new object under a name, a new thread
    count) rebuilds the prepack before the direct run: the numbers of a copy prepacked afresh."""
    layer = _recipe_layer(recipe, **({} if rotation is None else {"rotation": rotation}))
    x = torch.randn(2, 9, 128) * torch.linspace(0.2, 3, 128)
    threads = torch.get_num_threads() + (change == "threads")
    with torch.no_grad():
        layer(x)
        before = layer(x)
        if change == "bias in place":
            layer.bias.add_(1)
        elif change == "smooth storage" and getattr(layer, "smooth_scale", None) is not None:
            layer.smooth_scale.data = layer.smooth_scale.data * 2
        elif change == "rotation in place" and rotation == "duquant":  # P reversed: DuQuant's steps are prepacked
            layer.rotation_perm.copy_(layer.rotation_perm.flip(0))
        elif change == "rotation in place" and rotation == "hadamard":
            layer.rotation_signs.neg_()
        elif change == "object":
            layer._parameters["bias"] = nn.Parameter(layer.bias.data * 3, requires_grad=False)
        with torch_threads(threads):
            out = layer(x)
            expected = copy.deepcopy(layer)(x)  # an empty cache: prepacked from the layer's tensors now
    assert torch.equal(out, expected)
    assert change != "rotation in place" or rotation is None or not torch.equal(out, before)  # a change it must see


"""What diffusers' quantization test mixin (``tests/models/testing_utils/quantization.py``) demands of a backend,
for each of our storage formats, on CPU: parameter count, memory, dtype handling, keep-in-fp32, dequantize,
serialization, ``device_map`` / CPU and disk offload, group offloading, LoRA. The tiny DiT has uneven per-row weight scales.

Not testable on CPU: ``enable_sequential_cpu_offload`` (with ``device="cpu"`` accelerate fails on a float DiT
pipeline too; tested in test_offload_cuda.py where a GPU exists) and ``device_map="auto"`` across accelerators; the accelerate
hooks they install are tested here with CPU as execution device, and ``device_map="auto"`` with a CPU memory limit
(offloading to disk).
"""

from __future__ import annotations

import copy
import io
import json

import pytest
import torch

import compressdit
from accelerate import cpu_offload, dispatch_model
from diffusers import DiTPipeline, DiTTransformer2DModel, DPMSolverMultistepScheduler, FluxTransformer2DModel
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file
from torch import nn

from compressdit.errors import ConfigError
from compressdit.io.diffusers_quantizer import CompressditConfig
from compressdit.quant.kernel_registry import set_kernel
from compressdit.io.save import save_in_dtype
from compressdit.quant.layers import QuantizedLinear
from compressdit.quant.spec import LinearQuantSpec
from compressdit.quant.transform import LayerRule, quantize_layers, quantized_modules
from compressdit.zoo.train_dits import noise_scheduler_config
from tests.conftest import tiny_dit, tiny_flux, tiny_vae
from tests.io.test_diffusers_quantizer import (WEIGHTS, _dit_inputs, _quantize, _run, freeze_for_adapters,
                                              with_adapters)

FORMATS = {
    "int-w8a8": LinearQuantSpec(w_bits=8, a_bits=8),
    "int-w4-g64": LinearQuantSpec(w_bits=4, group_size=64),
    "vq-w3": LinearQuantSpec(format="vq", w_bits=3, vector_dim=2, codebook_size=64, row_scale=True),
    "twinlog-w4a4": LinearQuantSpec(format="twinlog", w_bits=4, a_bits=4, rotation="hadamard"),
}
# the float model is fp32; its embedders and head stay float
# twinlog: 5 fp32 parameters per row, heavy on the tiny model's 64-wide rows
MEMORY_RATIO = {"int-w8a8": 1.4, "int-w4-g64": 1.6, "vq-w3": 1.6, "twinlog-w4a4": 1.5}
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def rules(spec: LinearQuantSpec) -> list[LayerRule]:
    return [LayerRule("role:embedder", None), LayerRule("role:head", None), LayerRule("re:.*", spec)]


@pytest.fixture(scope="module", params=list(FORMATS))
def saved(request, tmp_path_factory):
    """(format, folder of the quantized tiny DiT saved by stock ``save_pretrained``, its output)."""
    model = _quantize(tiny_dit(), rules(FORMATS[request.param]))
    folder = tmp_path_factory.mktemp(request.param) / "model"
    model.save_pretrained(folder)
    return request.param, folder, _run(model, _dit_inputs())


def _load(folder, **kwargs) -> DiTTransformer2DModel:
    return DiTTransformer2DModel.from_pretrained(folder, **kwargs)


# -- counts, memory, layers ------------------------------------------------------------------------------------------

def test_num_parameters_equal_the_float_models_and_memory_is_smaller(saved):
    fmt, folder, _ = saved
    model, float_model = _load(folder), tiny_dit()
    assert model.num_parameters() == float_model.num_parameters()
    ratio = float_model.get_memory_footprint() / model.get_memory_footprint()
    assert ratio >= MEMORY_RATIO[fmt], f"memory ratio only {ratio:.2f}"
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    quantized = set(quantized_modules(model))
    assert quantized and quantized == set(model.config.quantization_config.modules)
    assert all(isinstance(model.get_submodule(n), QuantizedLinear) for n in quantized)
    assert len(linears) > len(quantized)  # embedders and head stay float


def test_reload_gives_identical_finite_outputs(saved):
    _, folder, expected = saved
    out = _run(_load(folder), _dit_inputs())
    assert torch.isfinite(out).all() and torch.equal(out, expected)
    assert not torch.allclose(out, _run(tiny_dit(), _dit_inputs()), atol=1e-3)  # really quantized


# -- dtypes --------------------------------------------------------------------------------------------------------

def test_pre_quantization_dtype_and_stored_tensor_dtypes(saved):
    _, folder, _ = saved
    assert _load(folder).config["_pre_quantization_dtype"] == torch.float32
    half = _load(folder, torch_dtype=torch.float16)
    assert half.config["_pre_quantization_dtype"] == torch.float16
    stored = load_file(str(folder / WEIGHTS))
    for name, module in quantized_modules(half).items():
        for tensor_name in module.quantized_tensors:
            tensor = getattr(module, tensor_name)
            if tensor is not None:  # packed codes, fp32 scales (fp16 codebooks) exactly as stored
                assert tensor.dtype == stored[f"{name}.{tensor_name}"].dtype, f"{name}.{tensor_name}"
    assert half.proj_out_1.weight.dtype == torch.float16


@pytest.mark.parametrize("torch_dtype", [None, torch.float16])
def test_fp16_checkpoint_loaded_and_saved_again_keeps_every_tensors_dtype(saved, tmp_path, torch_dtype):
    _, folder, _ = saved
    save_in_dtype(_load(folder), tmp_path / "fp16", torch.float16)  # as the pipeline saves an fp16 reference's
    config = json.loads((tmp_path / "fp16" / "config.json").read_text())["quantization_config"]
    assert config["pre_quantization_dtype"] == "float16"
    _load(tmp_path / "fp16", torch_dtype=torch_dtype).save_pretrained(tmp_path / "again")
    first, second = load_file(str(tmp_path / "fp16" / WEIGHTS)), load_file(str(tmp_path / "again" / WEIGHTS))
    assert set(first) == set(second)
    mismatched = [k for k in first if first[k].dtype != second[k].dtype or not torch.equal(first[k], second[k])]
    assert mismatched == []
    assert {t.dtype for t in first.values()} >= {torch.float16, torch.float32}


def test_dtype_casts_raise_and_moving_devices_works(saved):
    model = _load(saved[1])
    for cast in (lambda: model.to(torch.float16), lambda: model.to(device="cpu", dtype=torch.float16),
                 model.half, model.float):
        with pytest.raises(ValueError):
            cast()
    model.to("cpu")


def _quantized_state(model) -> dict[str, torch.Tensor]:
    return {f"{n}.{t}": getattr(m, t).detach().clone() for n, m in quantized_modules(model).items()
            for t in m.quantized_tensors if getattr(m, t, None) is not None}


def test_layer_dtype_casts_keep_the_quantized_tensors_as_saved(saved):
    """A quantized layer's own ``.half()`` / ``.to(bf16)`` casts its bias (what its outputs come in), never its codes
    or scales: as loading with ``torch_dtype`` does."""
    model = _load(saved[1])
    before = _quantized_state(model)
    layer = next(iter(quantized_modules(model).values()))
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        expected = layer(x)
        layer.half()
        out = layer(x.half())
    assert out.dtype == torch.float16 and layer.bias.dtype == (torch.float32 if "bias" in layer.quantized_tensors
                                                                 else torch.float16)
    assert torch.allclose(out.float(), expected, rtol=2e-2, atol=2e-2)
    after = _quantized_state(model)
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())


def test_layerwise_casting_leaves_the_quantized_tensors_as_saved(saved):
    """``enable_layerwise_casting`` (FP8 storage between forwards) hooks every ``nn.Linear``, our layers included:
    their biases are stored in FP8 like a float layer's, their codes and scales stay as saved, bit for bit."""
    model = _load(saved[1])
    before = _quantized_state(model)
    model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    out = _run(model, _dit_inputs())
    assert torch.isfinite(out).all()
    after = _quantized_state(model)
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())
    assert any(m.bias.dtype == torch.float8_e4m3fn for m in quantized_modules(model).values()
               if m.bias is not None and "bias" not in m.quantized_tensors) or saved[0] == "vq-w3"


class KeepHeadDiT(DiTTransformer2DModel):
    """A model class that declares a keep-in-fp32 module, as some diffusers transformers do."""

    _keep_in_fp32_modules = ["proj_out_1"]


def test_keep_in_fp32_modules_are_honoured(saved):
    _, folder, _ = saved
    model = KeepHeadDiT.from_pretrained(folder, torch_dtype=torch.float16)
    assert model.proj_out_1.weight.dtype == torch.float32 and model.proj_out_2.weight.dtype == torch.float16
    q = model.transformer_blocks[0].attn1.to_q
    assert isinstance(q, QuantizedLinear) and not q.weight.dtype.is_floating_point


# -- dequantize, serialization ---------------------------------------------------------------------------------------

def test_dequantize_gives_plain_linears_with_the_effective_weights(saved, tmp_path):
    fmt, folder, expected = saved
    model = _load(folder)
    weights = {n: m.effective_weight() for n, m in quantized_modules(model).items()}
    model.dequantize()
    assert not quantized_modules(model) and "quantization_config" not in model.config
    for name, weight in weights.items():
        linear = model.get_submodule(name)
        assert type(linear) is nn.Linear and torch.equal(linear.weight, weight), name
    out = _run(model, _dit_inputs())
    if FORMATS[fmt].a_bits is None:  # weight-only: the float model of the effective weights is the same model
        reference = _load(folder)
        set_kernel(reference, "reference")  # the CPU int4/int8 kernels round activations to bf16
        expected = _run(reference, _dit_inputs())
        assert torch.allclose(out, expected, atol=1e-4), float((out - expected).abs().max())
    model.save_pretrained(tmp_path)
    assert torch.equal(_run(_load(tmp_path), _dit_inputs()), out)


def test_save_after_forward_round_trips_bit_exactly(saved, tmp_path):
    _, folder, expected = saved
    model = _load(folder)
    assert torch.equal(_run(model, _dit_inputs()), expected)  # a forward first: nothing may re-pack
    model.save_pretrained(tmp_path, safe_serialization=True)
    first, second = load_file(str(folder / WEIGHTS)), load_file(str(tmp_path / WEIGHTS))
    assert set(first) == set(second) and all(torch.equal(first[k], second[k]) for k in first)
    assert torch.equal(_run(_load(tmp_path), _dit_inputs()), expected)


# -- device maps and offload -------------------------------------------------------------------------------------------

DISK_MAP = {"pos_embed": "cpu", "transformer_blocks.0": "cpu", "transformer_blocks.1": "disk",
            "proj_out_1": "cpu", "proj_out_2": "cpu"}


def test_device_map_cpu(saved):
    _, folder, expected = saved
    model = _load(folder, device_map="cpu")
    assert model.hf_device_map and model.device == torch.device("cpu")
    assert torch.equal(_run(model, _dit_inputs()), expected)


@pytest.mark.parametrize("torch_dtype", [None, torch.bfloat16])
def test_device_map_with_disk_offload_loads_scales_with_their_weights(saved, tmp_path, torch_dtype):
    """Same outputs as without offload; with bf16 too (diffusers casts what it offloads: scales are restored)."""
    _, folder, expected = saved
    if torch_dtype is not None:
        expected = _run(_load(folder, torch_dtype=torch_dtype), _dit_inputs())
    model = _load(folder, device_map=DISK_MAP, offload_folder=tmp_path / "offload", torch_dtype=torch_dtype)
    assert model.hf_device_map["transformer_blocks.1"] == "disk"
    offloaded = json.loads((tmp_path / "offload" / "index.json").read_text())
    name = "transformer_blocks.1.attn1.to_q"
    state = [t for t in quantized_modules(model)[name].quantized_tensors if t != "weight" and
             getattr(quantized_modules(model)[name], t) is not None]
    assert {f"{name}.weight"} | {f"{name}.{t}" for t in state} <= set(offloaded)
    assert model.transformer_blocks[1].attn1.to_q.weight.is_meta  # on disk until its block runs
    assert torch.equal(_run(model, _dit_inputs()), expected)
    assert torch.equal(_run(model, _dit_inputs()), expected)  # and again after offloading back


def test_accelerate_hooks_offload_to_cpu_and_disk(saved, tmp_path):
    _, folder, expected = saved
    model = _load(folder)
    cpu_offload(model, execution_device=torch.device("cpu"))  # what sequential CPU offload installs
    assert torch.equal(_run(model, _dit_inputs()), expected)
    model = _load(folder)
    dispatch_model(model, device_map=DISK_MAP, offload_dir=str(tmp_path / "disk"))
    assert torch.equal(_run(model, _dit_inputs()), expected)


def _flux_inputs() -> dict:
    gen = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(2, 16, 16, generator=gen), encoder_hidden_states=torch.randn(2, 5, 64),
                pooled_projections=torch.randn(2, 64), timestep=torch.tensor([0.3, 0.8]), img_ids=torch.zeros(16, 3),
                txt_ids=torch.zeros(5, 3), guidance=torch.ones(2), return_dict=False)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_device_map_auto_with_a_memory_limit_offloads_to_disk(fmt, tmp_path):
    """``device_map="auto"`` needs ``_no_split_modules``, which DiT lacks: a tiny FLUX transformer instead."""
    _quantize(tiny_flux(2, 2, 4, 64, 64), rules(FORMATS[fmt])).save_pretrained(tmp_path / "flux")
    inputs = _flux_inputs()
    with torch.no_grad():
        expected = FluxTransformer2DModel.from_pretrained(tmp_path / "flux")(**inputs)[0]
        model = FluxTransformer2DModel.from_pretrained(tmp_path / "flux", device_map="auto", max_memory={"cpu": 300_000},
                                                       offload_folder=tmp_path / "offload")
        assert model.hf_device_map["transformer_blocks"] == "disk"
        assert torch.equal(model(**inputs)[0], expected)


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("offload_type", ["block_level", "leaf_level"])
def test_group_offloading_to_disk(fmt, offload_type, tmp_path):
    """diffusers' group offloading (``enable_group_offload``; DiT does not support it: a tiny FLUX) with the groups
    written to disk and read back per forward: every packed tensor and scale travels with its layer."""
    _quantize(tiny_flux(2, 2, 4, 64, 64), rules(FORMATS[fmt])).save_pretrained(tmp_path / "flux")
    inputs = _flux_inputs()
    with torch.no_grad():
        expected = FluxTransformer2DModel.from_pretrained(tmp_path / "flux")(**inputs)[0]
        model = FluxTransformer2DModel.from_pretrained(tmp_path / "flux")
        per_group = {"num_blocks_per_group": 1} if offload_type == "block_level" else {}
        model.enable_group_offload(onload_device=torch.device("cpu"), offload_device=torch.device("cpu"),
                                   offload_type=offload_type, offload_to_disk_path=str(tmp_path / "groups"), **per_group)
        assert any((tmp_path / "groups").iterdir())
        assert torch.equal(model(**inputs)[0], expected)


def _pipeline(transformer) -> DiTPipeline:
    return DiTPipeline(transformer=transformer, vae=tiny_vae(),
                       scheduler=DPMSolverMultistepScheduler(**noise_scheduler_config()))


def test_pipeline_model_cpu_offload(saved):
    _, folder, _ = saved

    def generate(pipe):
        return pipe(class_labels=[1, 7], num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                    output_type="np").images

    expected = generate(_pipeline(_load(folder)))
    pipe = _pipeline(_load(folder))
    pipe.enable_model_cpu_offload(device="cpu")
    assert (generate(pipe) == expected).all()


# -- LoRA (peft) -------------------------------------------------------------------------------------------------

def _with_lora(model: nn.Module) -> nn.Module:
    """peft's LoRA layers injected as diffusers' ``add_adapter`` does (DiT has no PeftAdapterMixin)."""
    torch.manual_seed(0)
    return inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=LORA_TARGETS,
                                              init_lora_weights=False), model)


def test_peft_lora_runs_and_trains_on_quantized_linears(saved):
    fmt, folder, expected = saved
    model = _with_lora(_load(folder))
    q = model.transformer_blocks[0].attn1.to_q
    assert isinstance(q, LoraLayer) and isinstance(q.base_layer, QuantizedLinear)
    out = _run(model, _dit_inputs())
    assert torch.isfinite(out).all() and not torch.allclose(out, expected, atol=1e-4)
    if FORMATS[fmt].a_bits is None:  # the same adapter on the dequantized model gives the same output
        lora = {k: v for k, v in model.state_dict().items() if "lora_" in k}
        plain = _load(folder)
        plain.dequantize()
        plain = _with_lora(plain)
        assert not plain.load_state_dict(lora, strict=False).unexpected_keys
        reference = _run(plain, _dit_inputs())
        set_kernel(model, "reference")  # the CPU int4/int8 kernels round activations to bf16
        out = _run(model, _dit_inputs())
        assert torch.allclose(out, reference, atol=1e-4), float((out - reference).abs().max())
    model.train()
    model(**_dit_inputs(), return_dict=False)[0].pow(2).mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all("lora_" in n for n in grads)
    assert all(g is not None and float(g.norm()) > 0 for g in grads.values())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_adapter_training_under_autocast(saved, dtype):
    """diffusers' ``_test_quantization_training``: every parameter frozen (1-D ones cast to fp32 through ``.data``),
    adapters around the attention projections, forward and backward under ``torch.autocast`` (on CPU here); the
    adapters get gradients, and the quantized layers compute as without autocast (vq-w3 failed under bf16)."""
    fmt, folder, expected = saved
    model = freeze_for_adapters(_load(folder))
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        out = _run(model, _dit_inputs())
    # 4-bit activations move by whole steps where autocast's rounding of the float layers' outputs crosses a boundary:
    # on this random model as far as the quantization error itself (twin-log W4A4: 0.20-0.23 under bf16, the
    # dequantize reference as far; 0.27 from the float model); the kernels' own exactness under autocast is
    # tests/quant/test_quant_kernel_registry.py's
    tolerance = 0.3 if (FORMATS[fmt].a_bits or 16) < 8 else 0.05
    assert torch.isfinite(out).all() and ((out.float() - expected).norm() / expected.norm()) < tolerance
    adapters = with_adapters(block.attn1 for block in model.transformer_blocks)
    with torch.autocast("cpu", dtype=dtype):
        model(**_dit_inputs(), return_dict=False)[0].norm().backward()
    assert all(a.adapter[1].weight.grad is not None and float(a.adapter[1].weight.grad.norm()) > 0 for a in adapters)


def test_loaded_and_run_under_inference_mode(saved):
    """``from_pretrained`` inside ``torch.inference_mode()``: the tensors have no version counter, which the kernels'
    staleness check (and twin-log's rotation cache) read."""
    fmt, folder, expected = saved
    with torch.inference_mode():
        model = _load(folder)
        assert model.transformer_blocks[0].attn1.to_q.weight.is_inference()
        out = model(**_dit_inputs(), return_dict=False)[0]
        again = model(**_dit_inputs(), return_dict=False)[0]
    assert torch.equal(out, expected) and torch.equal(again, expected)


def test_whole_model_pickles_and_a_deep_copy_saves_itself(saved, tmp_path):
    """``torch.save(model)`` (the quantizer held a weak reference pickle refuses) and ``copy.deepcopy``: the copy's
    quantizer refers to the copy, which saves and reloads to the same outputs."""
    fmt, folder, expected = saved
    model = _load(folder)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    assert torch.equal(_run(torch.load(buffer, weights_only=False), _dit_inputs()), expected)
    twin = copy.deepcopy(model)
    assert twin.hf_quantizer._model() is twin
    twin.save_pretrained(tmp_path)
    assert torch.equal(_run(_load(tmp_path), _dit_inputs()), expected)


# -- on-the-fly quantization, as diffusers' QuantizationTesterMixin drives a backend ---------------------------------
# Its tests build each model with ``from_pretrained(float_folder, quantization_config=Config(**config_kwargs))`` and
# expect every ``nn.Linear`` quantized (bar ``_keep_in_fp32_modules``), ``modules_to_not_convert`` honoured, and the
# same counts, memory, serialization, LoRA, ``device_map``, dequantize and training as for a loaded checkpoint.

ON_THE_FLY = {
    "int-w8a8": {"rules": [{"match": "re:.*", "spec": {"w_bits": 8, "a_bits": 8}}]},
    "int-w4-g16": {"rules": [{"match": "re:.*", "spec": {"w_bits": 4, "group_size": 16}}]},
    "nvfp4": {"rules": [{"match": "re:.*", "spec": next(rule.spec for rule in reversed(
        compressdit.recipe_config("nvfp4").rules)).to_dict()}]},
}
ON_THE_FLY_MEMORY_RATIO = {"int-w8a8": 2.0, "int-w4-g16": 3.0, "nvfp4": 3.0}


@pytest.fixture(scope="module")
def float_flux(tmp_path_factory):
    folder = tmp_path_factory.mktemp("float-flux") / "model"
    tiny_flux(2, 2, 4, 64, 64).save_pretrained(folder)
    return folder


def _on_the_fly(folder, config_kwargs, **kwargs) -> FluxTransformer2DModel:
    return FluxTransformer2DModel.from_pretrained(folder, quantization_config=CompressditConfig(**config_kwargs),
                                                  **kwargs)


def _flux_run(model) -> torch.Tensor:
    torch.manual_seed(0)
    with torch.no_grad():
        return model(**_flux_inputs())[0]


@pytest.mark.parametrize("fmt", list(ON_THE_FLY))
def test_on_the_fly_counts_layers_memory_config_and_round_trip(float_flux, fmt, tmp_path):
    float_model = FluxTransformer2DModel.from_pretrained(float_flux)
    model = _on_the_fly(float_flux, ON_THE_FLY[fmt])
    assert model.num_parameters() == float_model.num_parameters()
    ratio = float_model.get_memory_footprint() / model.get_memory_footprint()
    assert ratio >= ON_THE_FLY_MEMORY_RATIO[fmt], f"memory ratio only {ratio:.2f}"
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears and all(isinstance(m, QuantizedLinear) for m in linears)
    config = model.config["quantization_config"]
    config.to_dict(), config.to_diff_dict(), json.loads(config.to_json_string())
    assert model.config["_pre_quantization_dtype"] == torch.float32
    out = _flux_run(model)
    assert torch.isfinite(out).all()
    quantize_layers(float_model, {n: LinearQuantSpec(**s) for n, s in config.modules.items()})
    assert torch.equal(out, _flux_run(float_model))  # the codes of quantizing the float model by hand
    for cast in (lambda: model.to(torch.float16), model.half, model.float):
        with pytest.raises(ValueError):
            cast()
    model.save_pretrained(tmp_path / "q", safe_serialization=True)
    assert torch.equal(_flux_run(FluxTransformer2DModel.from_pretrained(tmp_path / "q")), out)


def test_on_the_fly_modules_to_not_convert(float_flux):
    excluded = ["single_transformer_blocks.0", "proj_out"]
    model = _on_the_fly(float_flux, {**ON_THE_FLY["int-w8a8"], "modules_to_not_convert": excluded})
    named = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert any(any(e in n for e in excluded) for n, _ in named)
    for name, module in named:
        assert isinstance(module, QuantizedLinear) != any(e in name for e in excluded), name
    assert model.get_memory_footprint() > _on_the_fly(float_flux, ON_THE_FLY["int-w8a8"]).get_memory_footprint()
    assert model.config["quantization_config"].to_dict().get("modules_to_not_convert") is None  # resolved: modules
    with pytest.raises(ConfigError, match="modules_to_not_convert"):
        CompressditConfig(modules_to_not_convert=["proj_out"])


def test_on_the_fly_lora_device_map_dequantize_and_training(float_flux):
    model = _on_the_fly(float_flux, ON_THE_FLY["int-w4-g16"])
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=LORA_TARGETS, init_lora_weights=False))
    assert torch.isfinite(_flux_run(model)).all()

    mapped = _on_the_fly(float_flux, ON_THE_FLY["int-w4-g16"], device_map="auto")
    assert mapped.hf_device_map and torch.equal(_flux_run(mapped), _flux_run(_on_the_fly(float_flux,
                                                                                          ON_THE_FLY["int-w4-g16"])))
    plain = _on_the_fly(float_flux, ON_THE_FLY["int-w4-g16"])
    plain.dequantize()
    assert not quantized_modules(plain) and torch.isfinite(_flux_run(plain)).all()

    trained = freeze_for_adapters(_on_the_fly(float_flux, ON_THE_FLY["int-w4-g16"]))
    adapters = with_adapters(block.attn for block in trained.transformer_blocks)
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        trained(**_flux_inputs())[0].norm().backward()
    assert all(float(a.adapter[1].weight.grad.norm()) > 0 for a in adapters)

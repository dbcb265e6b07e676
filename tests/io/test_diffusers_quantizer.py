"""The diffusers-backend contract (compressdit.io.diffusers_quantizer) on tiny DiT and PixArt models.

What diffusers' own quantization tests demand of bitsandbytes / torchao / quanto: stock ``from_pretrained``
reloads identical outputs, dtype casts are refused, ``num_parameters()`` is unchanged, ``dequantize()`` gives
plain linears and a reloadable folder, LoRA-style adapters train on top, and broken checkpoints fail loudly.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import defaultdict
from enum import Enum
from pathlib import Path

import pytest
import torch
from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel
from diffusers.quantizers import auto as diffusers_auto
from safetensors.torch import load_file, save_file
from torch import nn

import compressdit
from compressdit.errors import CheckpointError, ConfigError, UnsupportedModelError
from compressdit.io.checkpoint import verify_safetensors
from compressdit.io.diffusers_quantizer import (FORMAT_VERSION, CompressditConfig, CompressditMethod,
                                                CompressditQuantizer, attach_quantizer, register_with_diffusers)
from compressdit.models import adapter_for
from compressdit.quant.layers import PackedParameter, QuantLinear
from compressdit.quant.spec import LinearQuantSpec
from compressdit.quant.transform import LayerRule, quantize_layers, quantized_modules, resolve_plan
from tests.conftest import tiny_dit, tiny_pixart

REPO = Path(__file__).resolve().parents[2]
WEIGHTS = "diffusion_pytorch_model.safetensors"
TEXT_DIM = 48  # not MiniLM's 384: the model is called directly with random text tokens

# mixed formats: 2/4/8-bit codes, grouped and per-channel, asymmetric, dynamic activations; head/embedders float
DIT_RULES = [
    LayerRule("role:embedder", None),
    LayerRule("role:head", None),
    LayerRule("role:attn_qkv", LinearQuantSpec(w_bits=4, a_bits=8, group_size=32, w_symmetric=False)),
    LayerRule("role:attn_out", LinearQuantSpec(w_bits=2, group_size=32)),
    LayerRule("role:ffn_up", LinearQuantSpec(w_bits=8, a_bits=8, a_granularity="per_tensor")),
    LayerRule("re:.*", LinearQuantSpec(w_bits=8)),
]


def _quantize(model: nn.Module, rules=DIT_RULES) -> nn.Module:
    plan = resolve_plan(model, adapter_for(model), rules)
    quantize_layers(model, plan)
    attach_quantizer(model, {n: s for n, s in plan.items() if s is not None})
    return model


def _dit_inputs() -> dict:
    gen = torch.Generator().manual_seed(7)
    return {"hidden_states": torch.randn(2, 4, 8, 8, generator=gen), "timestep": torch.tensor([10, 700]),
            "class_labels": torch.tensor([1, 7])}


def _pixart_inputs() -> dict:
    gen = torch.Generator().manual_seed(8)
    return {"hidden_states": torch.randn(2, 4, 8, 8, generator=gen), "timestep": torch.tensor([10, 700]),
            "encoder_hidden_states": torch.randn(2, 5, TEXT_DIM, generator=gen),
            "encoder_attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]),
            "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}


@torch.no_grad()
def _run(model: nn.Module, inputs: dict) -> torch.Tensor:
    inputs = {k: v.to(model.dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}
    return model(**inputs, return_dict=False)[0].float()


@pytest.fixture(scope="module")
def dit_qdir(tmp_path_factory):
    """A quantized tiny DiT saved with stock ``save_pretrained`` before any forward, and its output."""
    model = _quantize(tiny_dit())
    folder = tmp_path_factory.mktemp("qdit") / "model"
    model.save_pretrained(folder)
    return folder, _run(model, _dit_inputs())


@pytest.fixture()
def dit_loaded(dit_qdir):
    return DiTTransformer2DModel.from_pretrained(dit_qdir[0])


def _copy_with_tensors(src: Path, dst: Path, edit) -> Path:
    """Copy a single-file checkpoint folder, rewriting its safetensors through ``edit(dict)``."""
    dst.mkdir(parents=True)
    shutil.copy(src / "config.json", dst / "config.json")
    tensors = load_file(str(src / WEIGHTS))
    edit(tensors)
    save_file(tensors, str(dst / WEIGHTS), metadata={"format": "pt"})
    return dst


# -- round trips --------------------------------------------------------------------------------------------------

def test_stock_from_pretrained_gives_identical_outputs(dit_qdir, dit_loaded):
    folder, expected = dit_qdir
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressdit" and config["format_version"] == FORMAT_VERSION
    assert not any(k.startswith("load_in_") for k in config)  # would make diffusers assume bitsandbytes
    q = dit_loaded.transformer_blocks[0].attn1.to_q
    assert isinstance(q, QuantLinear) and isinstance(q.weight, PackedParameter)
    assert q.weight.dtype == torch.uint8 and q.weight.shape == (64, 32) and q.weight_zero is not None
    assert dit_loaded.transformer_blocks[0].attn1.to_out[0].weight.shape == (64, 16)
    assert dit_loaded.transformer_blocks[1].ff.net[2].weight.dtype == torch.int8
    assert type(dit_loaded.proj_out_1) is nn.Linear and type(dit_loaded.proj_out_2) is nn.Linear
    assert set(quantized_modules(dit_loaded)) == set(config["modules"])
    assert dit_loaded.is_quantized and isinstance(dit_loaded.hf_quantizer, CompressditQuantizer)
    assert isinstance(dit_loaded.config.quantization_config.quant_method, Enum)
    assert torch.equal(_run(dit_loaded, _dit_inputs()), expected)
    # the quantization really changed the model
    assert not torch.allclose(_run(tiny_dit(), _dit_inputs()), expected, atol=1e-3)


def test_pixart_round_trip_gives_identical_outputs(tmp_path):
    model = tiny_pixart(caption_channels=TEXT_DIM)
    rules = [LayerRule("role:embedder", None), LayerRule("role:head", None),
             LayerRule("role:cross_kv", LinearQuantSpec(w_bits=4, a_bits=8, group_size=16, w_symmetric=False)),
             LayerRule("re:.*", LinearQuantSpec(w_bits=8, a_bits=8))]
    _quantize(model, rules)
    assert isinstance(model.transformer_blocks[0].attn2.to_k, QuantLinear)
    assert isinstance(model.adaln_single.linear, QuantLinear)
    assert type(model.caption_projection.linear_1) is nn.Linear and type(model.proj_out) is nn.Linear
    model.save_pretrained(tmp_path)
    expected = _run(model, _pixart_inputs())
    loaded = PixArtTransformer2DModel.from_pretrained(tmp_path)
    assert set(quantized_modules(loaded)) == set(quantized_modules(model))
    assert loaded.transformer_blocks[1].attn2.to_v.weight.shape == (64, 32)
    assert torch.equal(_run(loaded, _pixart_inputs()), expected)
    assert not torch.allclose(_run(tiny_pixart(caption_channels=TEXT_DIM), _pixart_inputs()), expected, atol=1e-3)


def test_save_after_forward_reloads_identically(tmp_path):
    model = _quantize(tiny_dit(layers=2, seed=3))
    expected = _run(model, _dit_inputs())       # a forward first: nothing may re-pack or cache on the way
    model.save_pretrained(tmp_path)
    assert torch.equal(_run(model, _dit_inputs()), expected)
    loaded = DiTTransformer2DModel.from_pretrained(tmp_path)
    assert torch.equal(_run(loaded, _dit_inputs()), expected)


def test_second_save_round_trips_bit_exactly(dit_qdir, dit_loaded, tmp_path):
    folder, expected = dit_qdir
    dit_loaded.save_pretrained(tmp_path)
    first, second = load_file(str(folder / WEIGHTS)), load_file(str(tmp_path / WEIGHTS))
    assert set(first) == set(second)
    for key in first:
        assert first[key].dtype == second[key].dtype and torch.equal(first[key], second[key]), key
    again = DiTTransformer2DModel.from_pretrained(tmp_path)
    assert torch.equal(_run(again, _dit_inputs()), expected)
    assert (json.loads((tmp_path / "config.json").read_text())["quantization_config"]
            == json.loads((folder / "config.json").read_text())["quantization_config"])


def test_sharded_checkpoint_with_a_layer_split_across_shards(tmp_path):
    model = _quantize(tiny_dit())
    expected = _run(model, _dit_inputs())
    model.save_pretrained(tmp_path, max_shard_size="30KB")
    index = json.loads((tmp_path / f"{WEIGHTS}.index.json").read_text())["weight_map"]
    shards_of = defaultdict(set)
    for key, shard in index.items():
        shards_of[key.rpartition(".")[0]].add(shard)
    split = [n for n in quantized_modules(model) if len(shards_of[n]) > 1]
    assert split, "the test needs a quantized layer whose tensors sit in different shards"
    assert len(verify_safetensors(tmp_path)) > 2
    loaded = DiTTransformer2DModel.from_pretrained(tmp_path)
    assert torch.equal(_run(loaded, _dit_inputs()), expected)


def test_bfloat16_load_keeps_scales_fp32_and_codes_integer(dit_qdir, dit_loaded):
    folder, expected = dit_qdir
    model = DiTTransformer2DModel.from_pretrained(folder, torch_dtype=torch.bfloat16)
    for name, module in quantized_modules(model).items():
        ref = quantized_modules(dit_loaded)[name]
        assert module.weight_scale.dtype == torch.float32 and torch.equal(module.weight_scale, ref.weight_scale)
        assert module.weight.dtype in (torch.int8, torch.uint8) and torch.equal(module.weight, ref.weight), name
        if module.weight_zero is not None:
            assert module.weight_zero.dtype == torch.float32 and torch.equal(module.weight_zero, ref.weight_zero)
        assert module.bias.dtype == torch.bfloat16
    assert model.proj_out_1.weight.dtype == torch.bfloat16
    out = _run(model, _dit_inputs())
    assert torch.isfinite(out).all()
    # bf16 activations through 2 blocks: ~2% of the output's norm, values up to ~4 (bf16's step there: 1/64); the
    # largest element off by 0.104 where the small layers' GEMMs ran in bf16, 0.119 (1.9% of the norm against 2.1%)
    # where they run in fp32 on the bf16 input: a handful of bf16 steps either way
    assert torch.allclose(out, expected, atol=0.15, rtol=0.05), float((out - expected).abs().max())
    assert float((out - expected).norm() / expected.norm()) < 0.04


def test_device_map_cpu_loads_identically(dit_qdir):
    folder, expected = dit_qdir
    model = DiTTransformer2DModel.from_pretrained(folder, device_map="cpu")
    assert model.hf_device_map == {"": torch.device("cpu")}
    assert isinstance(model.transformer_blocks[0].attn1.to_q, QuantLinear)
    assert not any(t.is_meta for t in model.state_dict().values())
    assert torch.equal(_run(model, _dit_inputs()), expected)


# -- what diffusers' quantization tests check -----------------------------------------------------------------------

def test_num_parameters_unchanged_and_memory_footprint_smaller(dit_loaded):
    float_model = tiny_dit()
    assert dit_loaded.num_parameters() == float_model.num_parameters()
    assert dit_loaded.num_parameters(only_trainable=False) == sum(p.numel() for p in float_model.parameters())
    ratio = float_model.get_memory_footprint() / dit_loaded.get_memory_footprint()
    assert ratio >= 1.4, f"memory ratio only {ratio:.2f}"


def test_dtype_casts_of_a_quantized_model_raise(dit_loaded):
    with pytest.raises(ValueError, match="dtype"):
        dit_loaded.to(torch.float16)
    with pytest.raises(ValueError, match="dtype"):
        dit_loaded.to(device="cpu", dtype=torch.float16)
    with pytest.raises(ValueError, match="half"):
        dit_loaded.half()
    with pytest.raises(ValueError, match="float"):
        dit_loaded.float()
    dit_loaded.to("cpu")  # moving devices is fine
    q = dit_loaded.transformer_blocks[0].attn1.to_q
    assert q.weight.dtype == torch.uint8 and q.weight_scale.dtype == torch.float32
    assert dit_loaded.proj_out_1.weight.dtype == torch.float32


def test_dequantize_gives_linears_and_a_plain_reloadable_folder(dit_loaded, tmp_path):
    expected_weights = {n: m.dequantized_weight() for n, m in quantized_modules(dit_loaded).items()}
    dit_loaded.dequantize()
    assert not quantized_modules(dit_loaded)
    for name, weight in expected_weights.items():
        linear = dit_loaded.get_submodule(name)
        assert type(linear) is nn.Linear and torch.equal(linear.weight, weight), name
    assert "quantization_config" not in dit_loaded.config
    assert not getattr(dit_loaded, "is_quantized", False) and getattr(dit_loaded, "hf_quantizer", None) is None
    out = _run(dit_loaded, _dit_inputs())
    assert torch.isfinite(out).all()
    dit_loaded.save_pretrained(tmp_path)
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())
    assert all(t.is_floating_point() for t in load_file(str(tmp_path / WEIGHTS)).values())
    reloaded = DiTTransformer2DModel.from_pretrained(tmp_path)
    assert not getattr(reloaded, "is_quantized", False)
    assert torch.equal(_run(reloaded, _dit_inputs()), out)
    reloaded.half()  # a plain model again: casts are allowed


class LoRALayer(nn.Module):
    """A small trainable adapter around a frozen (quantized) linear, as in diffusers' quantization tests."""

    def __init__(self, module: nn.Module, rank: int = 4):
        super().__init__()
        self.module = module
        self.adapter = nn.Sequential(nn.Linear(module.in_features, rank, bias=False),
                                     nn.Linear(rank, module.out_features, bias=False))
        nn.init.normal_(self.adapter[0].weight, std=0.1)
        nn.init.normal_(self.adapter[1].weight, std=0.01)  # non-zero so both adapter matrices get gradients

    def forward(self, x, *args, **kwargs):
        return self.module(x, *args, **kwargs) + self.adapter(x)


def freeze_for_adapters(model: nn.Module) -> nn.Module:
    """diffusers' ``_test_quantization_training`` first step: every parameter frozen, the 1-D ones (norms, biases)
    cast to fp32 through ``.data``."""
    for param in model.parameters():
        param.requires_grad = False
        if param.ndim == 1:
            param.data = param.data.to(torch.float32)
    return model


def with_adapters(attentions, names=("to_q", "to_k", "to_v")) -> list[LoRALayer]:
    """Each attention's ``names`` projections wrapped in a :class:`LoRALayer` (the wrappers, in order)."""
    adapters = []
    for attention in attentions:
        for name in names:
            adapters.append(LoRALayer(getattr(attention, name)))
            setattr(attention, name, adapters[-1])
    return adapters


def test_lora_style_training_on_a_quantized_model(dit_loaded):
    model = freeze_for_adapters(dit_loaded)
    wrapped = []
    for block in model.transformer_blocks:
        assert isinstance(block.attn1.to_q, QuantLinear)
        block.attn1.to_q = LoRALayer(block.attn1.to_q)
        wrapped.append(block.attn1.to_q)
    model.train()
    inputs = _dit_inputs()
    out = model(**inputs, return_dict=False)[0]
    out.float().pow(2).mean().backward()
    for lora in wrapped:
        for layer in lora.adapter:
            assert layer.weight.grad is not None and float(layer.weight.grad.norm()) > 0
        assert lora.module.weight.grad is None and lora.module.weight_scale.grad is None
    # only the adapters train: every frozen (quantized or float) parameter stays gradient-free
    assert all(p.grad is None for n, p in model.named_parameters() if "adapter" not in n)


# -- registration -------------------------------------------------------------------------------------------------

_SUBPROCESS = r"""
import sys
import torch
torch.set_num_threads(1)
from diffusers import DiTTransformer2DModel
folder, inputs_path, out_path = sys.argv[1:4]
try:
    DiTTransformer2DModel.from_pretrained(folder)
except Exception as exc:
    print("WITHOUT:", type(exc).__name__, str(exc).splitlines()[0])
else:
    print("WITHOUT: loaded")
assert "compressdit" not in sys.modules, "compressdit was imported behind our back"
import compressdit
model = DiTTransformer2DModel.from_pretrained(folder)
print("WITH:", type(model.transformer_blocks[0].attn1.to_q).__name__)
with torch.no_grad():
    torch.save(model(**torch.load(inputs_path), return_dict=False)[0], out_path)
"""


def test_fresh_process_needs_import_compressdit(dit_qdir, tmp_path):
    """One fresh interpreter: loading fails before ``import compressdit`` and works after it (saves a 2nd start)."""
    folder, expected = dit_qdir
    torch.save(_dit_inputs(), tmp_path / "inputs.pt")
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", _SUBPROCESS, str(folder), str(tmp_path / "inputs.pt"),
                             str(tmp_path / "out.pt")], env=env, cwd=tmp_path, capture_output=True, text=True,
                            timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    without = next(line for line in lines if line.startswith("WITHOUT:"))
    assert "ValueError" in without and "Unknown quantization type" in without and "compressdit" in without
    assert "WITH: QuantLinear" in lines
    assert torch.equal(torch.load(tmp_path / "out.pt"), expected)


def test_registering_twice_is_idempotent(dit_qdir):
    quantizers = dict(diffusers_auto.AUTO_QUANTIZER_MAPPING)
    configs = dict(diffusers_auto.AUTO_QUANTIZATION_CONFIG_MAPPING)
    register_with_diffusers()
    register_with_diffusers()
    import importlib
    importlib.reload(compressdit)  # a second ``import`` path that registers again
    assert diffusers_auto.AUTO_QUANTIZER_MAPPING == quantizers
    assert diffusers_auto.AUTO_QUANTIZATION_CONFIG_MAPPING == configs
    assert diffusers_auto.AUTO_QUANTIZER_MAPPING["compressdit"] is CompressditQuantizer
    assert diffusers_auto.AUTO_QUANTIZATION_CONFIG_MAPPING["compressdit"] is CompressditConfig
    folder, expected = dit_qdir
    assert torch.equal(_run(DiTTransformer2DModel.from_pretrained(folder), _dit_inputs()), expected)


# -- CompressditConfig ----------------------------------------------------------------------------------------------

def test_config_round_trips_and_serialises():
    config = CompressditConfig(modules={"a.b": {"w_bits": 4, "group_size": 32}}, structure={"pruned": []})
    assert config.quant_method is CompressditMethod.COMPRESSDIT and config.quant_method.value == "compressdit"
    data = config.to_dict()
    assert data["modules"]["a.b"] == LinearQuantSpec(w_bits=4, group_size=32).to_dict()
    again = CompressditConfig(**json.loads(json.dumps(data)))
    assert again.to_dict() == data and again.config_hash() == config.config_hash()
    assert json.loads(config.to_json_string()) == data
    assert config.to_diff_dict() == data
    assert "compressdit" in repr(config)
    assert again.specs() == {"a.b": LinearQuantSpec(w_bits=4, group_size=32)}
    assert CompressditConfig(modules={"a.b": {"w_bits": 8}}).config_hash() != config.config_hash()
    assert CompressditConfig(quant_method=CompressditMethod.COMPRESSDIT).modules == {}


def test_config_is_strict():
    with pytest.raises(ConfigError, match="unknown key 'load_in_4bit'"):
        CompressditConfig(modules={}, load_in_4bit=True)
    with pytest.raises(ConfigError, match=f"format_version {FORMAT_VERSION + 1} is newer"):
        CompressditConfig(format_version=FORMAT_VERSION + 1)
    with pytest.raises(ConfigError, match="format_version '1'"):
        CompressditConfig(format_version="1")
    with pytest.raises(ConfigError, match="quant_method must be 'compressdit', got 'bitsandbytes'"):
        CompressditConfig(quant_method="bitsandbytes")
    with pytest.raises(ConfigError, match=r"modules\['a\.b'\]: unknown key 'bits'"):
        CompressditConfig(modules={"a.b": {"bits": 4}})
    with pytest.raises(ConfigError, match=r"modules\['a\.b'\]\.w_bits: 12 is out of range"):
        CompressditConfig(modules={"a.b": {"w_bits": 12}})
    with pytest.raises(ConfigError, match=r"modules\['a\.b'\]\.format: unknown format 'nf4'"):
        CompressditConfig(modules={"a.b": {"format": "nf4"}})


def test_checkpoint_with_newer_format_version_or_unknown_key_fails_to_load(dit_qdir, tmp_path):
    folder, _ = dit_qdir
    for key, value, message in (("format_version", FORMAT_VERSION + 1, "is newer"),
                                ("codebook", [1, 2], "unknown key 'codebook'")):
        target = tmp_path / key
        shutil.copytree(folder, target)
        config = json.loads((target / "config.json").read_text())
        config["quantization_config"][key] = value
        (target / "config.json").write_text(json.dumps(config))
        with pytest.raises(ConfigError, match=message):
            DiTTransformer2DModel.from_pretrained(target)


# -- broken checkpoints -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["transformer_blocks.0.attn1.to_q.weight_scale",
                                 "transformer_blocks.1.attn1.to_k.weight_zero",
                                 "transformer_blocks.1.ff.net.2.weight"])
def test_checkpoint_missing_a_tensor_names_the_key(dit_qdir, tmp_path, key):
    folder = _copy_with_tensors(dit_qdir[0], tmp_path / "broken", lambda t: t.pop(key))
    with pytest.raises(CheckpointError, match=f"missing {key.replace('.', r'.')}"):
        DiTTransformer2DModel.from_pretrained(folder)


def test_checkpoint_tensor_with_wrong_shape_names_the_key(dit_qdir, tmp_path):
    key = "transformer_blocks.0.attn1.to_q.weight_scale"

    def edit(tensors):
        tensors[key] = torch.ones(64, 1)  # per-channel scales where the config says groups of 32

    folder = _copy_with_tensors(dit_qdir[0], tmp_path / "shape", edit)
    with pytest.raises(CheckpointError, match=rf"{key}: checkpoint shape \(64, 1\) does not match .*\(64, 2\)"):
        DiTTransformer2DModel.from_pretrained(folder)


def test_checkpoint_with_unpacked_codes_names_the_key(dit_qdir, tmp_path):
    key = "transformer_blocks.0.attn1.to_out.0.weight"

    def edit(tensors):  # 2-bit codes stored one per byte: wrong layout
        tensors[key] = torch.zeros(64, 64, dtype=torch.uint8)

    folder = _copy_with_tensors(dit_qdir[0], tmp_path / "layout", edit)
    with pytest.raises(CheckpointError, match=rf"{key}: checkpoint shape \(64, 64\)"):
        DiTTransformer2DModel.from_pretrained(folder)


def test_checkpoint_tensor_with_wrong_dtype_names_the_key(dit_qdir, tmp_path):
    key = "transformer_blocks.1.ff.net.2.weight"

    def edit(tensors):  # fake-quantized floats instead of int8 codes
        tensors[key] = tensors[key].float()

    folder = _copy_with_tensors(dit_qdir[0], tmp_path / "dtype", edit)
    with pytest.raises(CheckpointError, match=rf"{key}: checkpoint dtype torch.float32"):
        DiTTransformer2DModel.from_pretrained(folder)


def test_checkpoint_tensor_the_config_does_not_use_is_an_error(dit_qdir, tmp_path):
    """A zero point the config does not expect (config edited to symmetric) must not be dropped with a warning."""
    folder = tmp_path / "mismatch"
    shutil.copytree(dit_qdir[0], folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["modules"]["transformer_blocks.0.attn1.to_q"]["w_symmetric"] = True
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"transformer_blocks\.0\.attn1\.to_q\.weight_zero"):
        DiTTransformer2DModel.from_pretrained(folder)


# -- on-the-fly quantization ---------------------------------------------------------------------------------------

def test_on_the_fly_quantization_of_a_float_checkpoint(dit_model_dir, tmp_path):
    spec4 = LinearQuantSpec(w_bits=4, a_bits=8, group_size=32)
    spec8 = LinearQuantSpec(w_bits=8)
    modules = {"transformer_blocks.0.attn1.to_q": spec4.to_dict(), "transformer_blocks.1.ff.net.2": spec8.to_dict()}
    model = DiTTransformer2DModel.from_pretrained(dit_model_dir, quantization_config=CompressditConfig(modules=modules))
    assert set(quantized_modules(model)) == set(modules)
    assert type(model.transformer_blocks[1].attn1.to_q) is nn.Linear
    # the same codes as quantizing the float weights by hand
    float_model = DiTTransformer2DModel.from_pretrained(dit_model_dir)
    by_hand = QuantLinear.from_linear(float_model.transformer_blocks[0].attn1.to_q, spec4)
    q = model.transformer_blocks[0].attn1.to_q
    assert torch.equal(q.weight, by_hand.weight) and torch.equal(q.weight_scale, by_hand.weight_scale)
    quantize_layers(float_model, {n: LinearQuantSpec(**s) for n, s in modules.items()})
    expected = _run(float_model, _dit_inputs())
    assert torch.equal(_run(model, _dit_inputs()), expected)
    assert model.is_quantized and model.config.quantization_config.modules == modules
    model.save_pretrained(tmp_path)
    reloaded = DiTTransformer2DModel.from_pretrained(tmp_path)
    assert set(quantized_modules(reloaded)) == set(modules)
    assert torch.equal(_run(reloaded, _dit_inputs()), expected)


def test_on_the_fly_config_naming_a_missing_module_is_a_config_error(dit_model_dir):
    config = CompressditConfig(modules={"transformer_blocks.9.attn1.to_q": {"w_bits": 8}})
    with pytest.raises(ConfigError, match=r"'transformer_blocks\.9\.attn1\.to_q'"):
        DiTTransformer2DModel.from_pretrained(dit_model_dir, quantization_config=config)


W8A8_RULES = [{"match": "role:embedder", "spec": None}, {"match": "role:head", "spec": None},
              {"match": "re:.*", "spec": {"w_bits": 8, "a_bits": 8}}]


def test_on_the_fly_rules_resolve_against_the_model_and_round_trip(dit_model_dir, tmp_path):
    """``rules`` (a recipe's quantize stage) quantize a float checkpoint as it loads: the modules they resolve to on
    this model, the same codes as quantizing by hand, a saved config naming those modules (no rules), an identical
    reload; the user's config object is left as given, so that it loads other models (in other dtypes) too."""
    config = CompressditConfig(rules=W8A8_RULES)
    model = DiTTransformer2DModel.from_pretrained(dit_model_dir, quantization_config=config)
    by_hand = DiTTransformer2DModel.from_pretrained(dit_model_dir)
    rules = [LayerRule.from_dict(rule, "rule") for rule in W8A8_RULES]
    plan = {n: s for n, s in resolve_plan(by_hand, adapter_for(by_hand), rules).items() if s is not None}
    quantize_layers(by_hand, plan)
    assert set(quantized_modules(model)) == set(plan) and len(plan) > 4
    assert "proj_out_2" not in plan and "pos_embed.proj" not in plan  # head and embedder stay float
    expected = _run(by_hand, _dit_inputs())
    assert torch.equal(_run(model, _dit_inputs()), expected)
    saved = model.config.quantization_config
    assert saved is not config and set(saved.modules) == set(plan) and not saved.rules
    model.save_pretrained(tmp_path / "q")
    stored = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert "rules" not in stored and set(stored["modules"]) == set(plan)
    assert torch.equal(_run(DiTTransformer2DModel.from_pretrained(tmp_path / "q"), _dit_inputs()), expected)
    bf16 = DiTTransformer2DModel.from_pretrained(dit_model_dir, quantization_config=config, torch_dtype=torch.bfloat16)
    assert bf16.config.quantization_config.pre_quantization_dtype == "bfloat16"
    assert config.modules == {} and config.pre_quantization_dtype is None and len(config.rules) == 3
    assert config.to_dict()["rules"] == CompressditConfig.from_dict(config.to_dict()).to_dict()["rules"]


def test_on_the_fly_quantizes_each_linear_as_it_loads(dit_model_dir, tmp_path, monkeypatch):
    """A linear is quantized as soon as its weight and bias are in, so that the float model is never whole in memory
    (bitsandbytes' way): from one file, no other planned linear holds float weights then; from shards that split a
    layer's weight from its bias, the few that wait for their other half; the codes are those of quantizing by hand."""
    from compressdit.io import diffusers_quantizer

    DiTTransformer2DModel.from_pretrained(dit_model_dir).save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 3
    seen = []

    def spy(model, plan, *args, **kwargs):
        float_loaded = [n for n in model.config.quantization_config.modules
                        if type(model.get_submodule(n)) is nn.Linear and not model.get_submodule(n).weight.is_meta]
        seen.append((list(plan), float_loaded))
        return quantize_layers(model, plan, *args, **kwargs)

    monkeypatch.setattr(diffusers_quantizer, "quantize_layers", spy)
    config = CompressditConfig(rules=W8A8_RULES)
    model = DiTTransformer2DModel.from_pretrained(dit_model_dir, quantization_config=config)
    assert len(seen) == len(quantized_modules(model)) > 4
    assert all(float_loaded == names for names, float_loaded in seen), seen
    seen.clear()
    sharded = DiTTransformer2DModel.from_pretrained(tmp_path / "sharded", quantization_config=config)
    assert len(seen) == len(quantized_modules(sharded)) and max(len(loaded) for _, loaded in seen) <= 3, seen
    by_hand = DiTTransformer2DModel.from_pretrained(dit_model_dir)
    quantize_layers(by_hand, model.config.quantization_config.specs())
    expected = _run(by_hand, _dit_inputs())
    assert torch.equal(_run(model, _dit_inputs()), expected) and torch.equal(_run(sharded, _dit_inputs()), expected)


def test_on_the_fly_with_disk_offload_is_one_clear_error(dit_model_dir, tmp_path):
    with pytest.raises(CheckpointError, match="offloaded to disk"):
        DiTTransformer2DModel.from_pretrained(dit_model_dir, quantization_config=CompressditConfig(rules=W8A8_RULES),
                                              device_map={"": "disk"}, offload_folder=tmp_path / "offload")


class KeepAllFloatHeadDiT(DiTTransformer2DModel):
    _keep_in_fp32_modules = ["proj_out_1"]


def test_on_the_fly_rules_leave_keep_in_fp32_modules_float(dit_model_dir):
    config = CompressditConfig(rules=[{"match": "re:.*", "spec": {"w_bits": 8}}])
    model = KeepAllFloatHeadDiT.from_pretrained(dit_model_dir, quantization_config=config, torch_dtype=torch.float16)
    quantized = set(quantized_modules(model))
    assert "proj_out_2" in quantized and "proj_out_1" not in quantized
    assert model.proj_out_1.weight.dtype == torch.float32


@pytest.mark.parametrize("kwargs, needles", [
    (dict(rules=W8A8_RULES, modules={"proj_out_2": {"w_bits": 8}}), ["modules", "rules", "not both"]),
    (dict(rules=[]), ["rules", "non-empty"]),
    (dict(rules=[{"match": "re:.*", "spec": {"w_bits": 8, "a_bits": 8, "balance": 0.5}}]),
     ["rules[0]", "calibration", "compressdit quantize"]),
    (dict(rules=[{"match": "re:.*", "spec": {"w_bits": 4, "rounding": "gptq"}}]), ["rules[0]", "calibration"]),
    (dict(rules=[{"match": "re:.*", "spec": {"w_bit": 8}}]), ["rules[0]", "w_bit"]),
    (dict(rules=[{"match": "re:(", "spec": {"w_bits": 8}}]), ["rules[0]", "regex"]),
], ids=["both", "empty", "balance", "gptq", "typo", "regex"])
def test_on_the_fly_rules_that_cannot_load_name_why(kwargs, needles):
    with pytest.raises(ConfigError) as info:
        CompressditConfig(**kwargs)
    assert all(needle in str(info.value) for needle in needles), str(info.value)


def test_on_the_fly_rules_matching_no_layer_are_an_error(dit_model_dir):
    config = CompressditConfig(rules=[{"match": "role:embedder", "spec": None}, {"match": "re:nothing\\..*",
                                                                                 "spec": {"w_bits": 8}}])
    with pytest.raises(ConfigError, match="rules match no linear layer of DiTTransformer2DModel"):
        DiTTransformer2DModel.from_pretrained(dit_model_dir, quantization_config=config)
    typo = CompressditConfig(rules=[{"match": "proj_out_3", "spec": {"w_bits": 8}}])
    with pytest.raises(ConfigError, match="'proj_out_3' names no linear layer of DiTTransformer2DModel; did you mean"):
        DiTTransformer2DModel.from_pretrained(dit_model_dir, quantization_config=typo)


def test_dequantize_keeps_a_mixture_of_blocks_manifest(tmp_path):
    """``dequantize()`` kept the width / heads / MoE manifest but dropped MoB's: saving then wrote a folder that
    stock diffusers reloaded as the dense model (its routers only "not used" in a warning), outputs off by ~6."""
    from compressdit.io.save import record_structure
    from compressdit.moe.blocks import routed_stacks
    from tests.moe.test_mob import _predict, _routed

    _, model = _routed()
    record_structure(model)
    model.save_pretrained(tmp_path / "mob")
    reloaded = DiTTransformer2DModel.from_pretrained(tmp_path / "mob")
    reloaded.dequantize()
    assert reloaded.config.quantization_config.structure["mob"] == model.config.quantization_config.structure["mob"]
    reloaded.save_pretrained(tmp_path / "again")
    again = DiTTransformer2DModel.from_pretrained(tmp_path / "again")
    assert len(routed_stacks(again)["transformer_blocks"]) == 4
    torch.testing.assert_close(_predict(again), _predict(model), rtol=1e-5, atol=1e-5)


def test_fusing_quantized_projections_is_refused_and_changes_nothing():
    """``model.fuse_qkv_projections()`` (diffusers' speed-up) on a quantized model: one clear error before anything
    changed, the model runs as before; a float model still fuses (the guard passes it through)."""
    model = _quantize(tiny_pixart(caption_channels=TEXT_DIM), [LayerRule("role:embedder", None),
                                                               LayerRule("role:head", None),
                                                               LayerRule("re:.*", LinearQuantSpec(w_bits=8, a_bits=8))])
    expected = _run(model, _pixart_inputs())
    with pytest.raises(ValueError, match=r"fuse_qkv_projections: Attention\.to_q is quantized by compressdit"):
        model.fuse_qkv_projections()
    assert not any(hasattr(m, "to_qkv") or hasattr(m, "to_kv") for m in model.modules())
    assert torch.equal(_run(model, _pixart_inputs()), expected)
    plain = tiny_pixart(caption_channels=TEXT_DIM)
    unfused = _run(plain, _pixart_inputs())
    plain.fuse_qkv_projections()
    assert hasattr(plain.transformer_blocks[0].attn1, "to_qkv")
    torch.testing.assert_close(_run(plain, _pixart_inputs()), unfused, rtol=1e-4, atol=1e-5)


def test_pipeline_quant_backend_quantizes_the_transformer_and_refuses_text_encoders(text_pipeline_dir):
    """``PipelineQuantizationConfig(quant_backend="compressdit", quant_kwargs=...)``: diffusers accepts a backend only
    where transformers names it too, with the same config parameters; with ``components_to_quantize=["transformer"]``
    the transformer is quantized as by ``quant_mapping`` (the same layers, the text encoder float), without it
    building the text encoder's config raises one line naming that fix (never a transformers model half-quantized)."""
    from diffusers import DiffusionPipeline, PipelineQuantizationConfig

    from compressdit.quant.transform import quantized_modules

    folder = text_pipeline_dir("pixart")
    rules = compressdit.recipe_config("rtn-w8a8").to_dict()["rules"]  # plain data, as a user writes them
    backend = PipelineQuantizationConfig(quant_backend="compressdit", quant_kwargs={"rules": rules},
                                         components_to_quantize=["transformer"])
    pipe = DiffusionPipeline.from_pretrained(folder, quantization_config=backend)
    mapped = DiffusionPipeline.from_pretrained(folder, quantization_config=PipelineQuantizationConfig(
        quant_mapping={"transformer": compressdit.recipe_config("rtn-w8a8")}))
    assert quantized_modules(pipe.transformer) and not quantized_modules(pipe.text_encoder)
    assert set(quantized_modules(pipe.transformer)) == set(quantized_modules(mapped.transformer))
    everything = PipelineQuantizationConfig(quant_backend="compressdit", quant_kwargs={"rules": rules})
    with pytest.raises((ConfigError, UnsupportedModelError), match=r"components_to_quantize=\['transformer'\]"):
        DiffusionPipeline.from_pretrained(folder, quantization_config=everything)  # the VAE or text encoder first
    with pytest.raises(ConfigError, match=r"components_to_quantize=\['transformer'\]"):  # a text encoder alone
        everything._resolve_quant_config(is_diffusers=False, module_name="text_encoder")
    from transformers.quantizers.auto import AutoQuantizationConfig
    with pytest.raises(ConfigError, match="transformers components"):  # a transformers checkpoint naming the method
        AutoQuantizationConfig.from_dict({"quant_method": "compressdit"})

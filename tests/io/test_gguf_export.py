"""GGUF export (compressdit.io.gguf_export): the shipped flux-fmnist (float, W8A8 and W4 checkpoints of it) to
Q8_0 / Q4_0, read back with ``gguf``'s own reader and loaded by stock diffusers' ``GGUFQuantizationConfig``; a tiny
SD3 in SAI's original names through diffusers' converter; bad inputs as one-line errors."""

from __future__ import annotations

import sys

import gguf
import numpy as np
import pytest
import torch
from diffusers import FluxTransformer2DModel, GGUFQuantizationConfig, SD3Transformer2DModel
from diffusers.quantizers.gguf.utils import GGUFLinear, dequantize_gguf_tensor

from compressdit.errors import CheckpointError, ConfigError, UnsupportedModelError
from compressdit.io.diffusers_quantizer import attach_quantizer
from compressdit.io.gguf_export import export_gguf, load_float_transformer
from compressdit.io.sources import resolve_path
from compressdit.models import adapter_for
from compressdit.quant.spec import LinearQuantSpec
from compressdit.quant.transform import LayerRule, quantize_layers, resolve_plan
from tests.conftest import tiny_dit, tiny_sd3

FLUX = "zoo:flux-fmnist"
BLOCK = 32
KEPT = "transformer_blocks.0.ff.net.2"  # left float by the quantized checkpoints' plan: must stay float in the GGUF
# largest error of one weight, in units of its 32-block's absmax: Q8_0 rounds to steps d = amax/127, Q4_0 to
# d = amax/8 where the block's extreme value clips from +8 to +7 (a full step); d is stored as fp16, which adds
# up to |q| * d * 2**-11 (|q| <= 127 / 8)
ERROR_PER_ABSMAX = {"Q8_0": (0.5 + 127 * 2**-11) / 127, "Q4_0": (1 + 8 * 2**-11) / 8}


def _flux_folder():
    return resolve_path(FLUX) / "transformer"


def _quantized_flux(tmp_path_factory, spec: LinearQuantSpec, name: str):
    model = FluxTransformer2DModel.from_pretrained(_flux_folder()).eval()
    rules = [LayerRule("role:embedder", None), LayerRule("role:head", None), LayerRule(KEPT, None),
             LayerRule("re:.*", spec)]
    plan = resolve_plan(model, adapter_for(model), rules)
    quantize_layers(model, plan)
    attach_quantizer(model, {n: s for n, s in plan.items() if s is not None})
    folder = tmp_path_factory.mktemp("gguf") / name
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    return {"float": FLUX,
            "w8a8": str(_quantized_flux(tmp_path_factory, LinearQuantSpec(w_bits=8, a_bits=8), "w8a8")),
            "w4": str(_quantized_flux(tmp_path_factory, LinearQuantSpec(w_bits=4, group_size=32), "w4"))}


def _read(path) -> dict[str, tuple[str, np.ndarray]]:
    reader = gguf.GGUFReader(path)
    return {t.name: (t.tensor_type.name, gguf.quants.dequantize(t.data, t.tensor_type)) for t in reader.tensors}


def _field(path, key: str) -> str:
    return gguf.GGUFReader(path).get_field(key).contents()


def _inputs(model):
    adapter = adapter_for(model)
    latents = torch.randn(2, adapter.latent_shape(model)[0], 8, 8, generator=torch.Generator().manual_seed(0))
    return adapter, latents, adapter.synthetic_conditioning(model, 2, seed=1)


@torch.no_grad()
def _relative_output_error(reference, candidate) -> float:
    adapter, latents, cond = _inputs(reference)
    expected = adapter.predict(reference, latents, torch.tensor(500.0), cond)
    got = adapter.predict(candidate, latents, torch.tensor(500.0), cond)
    return float((got - expected).norm() / expected.norm())


@pytest.mark.parametrize("quant", ["Q8_0", "Q4_0"])
@pytest.mark.parametrize("source", ["float", "w8a8", "w4"])
def test_flux_fmnist_export_matches_the_dequantized_weights(sources, tmp_path, source, quant):
    out = tmp_path / f"flux-{source}-{quant}.gguf"
    result = export_gguf(sources[source], out, quant)
    # flux-fmnist is not FLUX.1-sized: the original names' loaders cannot rebuild it, so diffusers names
    assert result.names == "diffusers" and _field(out, "general.architecture") == "diffusers"
    assert _field(out, "diffusers.model_class") == "FluxTransformer2DModel"
    model, quantized, float_dtype = load_float_transformer(sources[source])
    assert bool(quantized) == (source != "float")
    # the zoo model is stored in fp16 (kept 2-D tensors are written so, exactly); our checkpoints here in fp32
    assert float_dtype == (torch.float16 if source == "float" else torch.float32)
    kept_type = "F16" if source == "float" else "F32"
    state = model.state_dict()
    tensors = _read(out)
    assert set(tensors) == set(state)
    adapter = adapter_for(model)
    for name, (qtype, values) in tensors.items():
        ours = state[name].float().numpy()
        module = name.removesuffix(".weight")
        float_kept = (ours.ndim < 2 or adapter.role_of(module) in adapter.keep_full_precision
                      or (quantized and module not in quantized))
        if float_kept:
            assert qtype == ("F32" if ours.ndim < 2 or ours.size <= 1024 else kept_type), name
            assert np.array_equal(values.reshape(ours.shape), ours), name
            continue
        assert qtype == quant, name
        blocks = ours.reshape(ours.shape[0], -1, BLOCK)
        bound = np.abs(blocks).max(axis=-1, keepdims=True) * ERROR_PER_ABSMAX[quant] + 1e-7
        assert (np.abs(values.reshape(blocks.shape) - blocks) <= bound).all(), name
    assert tensors[f"{KEPT}.weight"][0] == (kept_type if source != "float" else quant)


@pytest.mark.parametrize("quant,max_error", [("Q8_0", 0.01), ("Q4_0", 0.1)])
def test_diffusers_gguf_loader_reads_the_flux_fmnist_export(tmp_path, quant, max_error):
    out = tmp_path / f"flux-{quant}.gguf"
    export_gguf(FLUX, out, quant)
    loaded = FluxTransformer2DModel.from_single_file(
        str(out), quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32),
        config=str(_flux_folder()), local_files_only=True)
    tensors = _read(out)
    gguf_linears = {n: m for n, m in loaded.named_modules() if isinstance(m, GGUFLinear)}
    assert {f"{n}.weight" for n in gguf_linears} == {n for n, (t, _) in tensors.items() if t == quant}
    for name, module in gguf_linears.items():  # diffusers decodes (fp16 scales) what gguf's reader decodes
        expected = torch.from_numpy(tensors[f"{name}.weight"][1])
        torch.testing.assert_close(dequantize_gguf_tensor(module.weight).float(), expected, rtol=2e-3, atol=1e-6)
    reference = FluxTransformer2DModel.from_pretrained(_flux_folder()).eval()
    error = _relative_output_error(reference, loaded)
    assert 0 < error < max_error


def _sd3_256():
    """SD3 with ComfyUI's geometry (64-dim heads) and 256-wide layers, which K-quants need."""
    torch.manual_seed(0)
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                 attention_head_dim=64, num_attention_heads=4, joint_attention_dim=256,
                                 caption_projection_dim=256, pooled_projection_dim=32, pos_embed_max_size=16).eval()


@pytest.mark.parametrize("quant,max_error", [("Q8_0", 0.01), ("Q4_K", 0.05), ("Q5_K", 0.02)])
def test_sd3_original_names_load_through_diffusers_converter(tmp_path, quant, max_error):
    model = tiny_sd3(3, (0,), text_dim=32, pooled_dim=32) if quant == "Q8_0" else _sd3_256()
    folder = tmp_path / "sd3"
    model.save_pretrained(folder)
    out = tmp_path / f"sd3-{quant}.gguf"
    result = export_gguf(str(folder), out, quant)
    width = model.config.caption_projection_dim
    assert result.arch == "sd3" and result.names == "original" and _field(out, "general.architecture") == "sd3"
    assert (result.note is None) == (width == 256)  # ComfyUI assumes 64-dim heads
    tensors = _read(out)
    assert tensors["joint_blocks.0.x_block.attn.qkv.weight"][0] == quant
    assert tensors["joint_blocks.0.x_block.attn.qkv.weight"][1].shape == (3 * width, width)
    assert "pos_embed" in tensors and tensors["x_embedder.proj.weight"][0] == "F32"
    loaded = SD3Transformer2DModel.from_single_file(
        str(out), quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32), config=str(folder),
        local_files_only=True)
    assert loaded.transformer_blocks[0].attn.to_q.weight.quant_type == gguf.GGMLQuantizationType[quant]
    assert 0 < _relative_output_error(model, loaded) < max_error


def test_bad_inputs_fail_before_loading(tmp_path):
    with pytest.raises(ConfigError, match="--quant Q3_K"):
        export_gguf(FLUX, tmp_path / "a.gguf", "Q3_K")
    with pytest.raises(ConfigError, match="--names bfl"):
        export_gguf(FLUX, tmp_path / "a.gguf", "Q8_0", names="bfl")
    (tmp_path / "exists.gguf").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="use --overwrite"):
        export_gguf(FLUX, tmp_path / "exists.gguf", "Q8_0")
    assert (tmp_path / "exists.gguf").read_bytes() == b"x"


def test_a_full_disk_is_one_error_and_leaves_nothing(tmp_path, monkeypatch):
    """gguf's writer reports a short write as a bare ``OSError: 8192 requested and 2464 written``; the export
    names the file, and leaves neither it nor its temporary sibling (the short write is simulated)."""
    def short_write(self, *args, **kwargs):
        raise OSError("8192 requested and 2464 written")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", short_write)
    with pytest.raises(CheckpointError, match=r"cannot write .*full\.gguf: 8192 requested .*nothing was written"):
        export_gguf(FLUX, tmp_path / "full.gguf", "Q8_0")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(CheckpointError, match="a-file is a file, not a folder"):
        export_gguf(FLUX, tmp_path / "a-file" / "x.gguf", "Q8_0")


def test_class_without_a_gguf_loader_is_refused(tmp_path):
    tiny_dit().save_pretrained(tmp_path / "dit")
    with pytest.raises(UnsupportedModelError, match="DiTTransformer2DModel has no GGUF loader"):
        export_gguf(str(tmp_path / "dit"), tmp_path / "dit.gguf", "Q8_0")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".dit.gguf*"))


def test_cli_reports_errors_in_one_line(tmp_path, monkeypatch, capsys):
    from compressdit.cli import main

    for args, message in ((["zoo:nope"], "no zoo model 'nope'"), (["--quant", "Q3_K", FLUX], "--quant Q3_K"),
                          (["--format", "onnx", FLUX], "--format onnx")):
        if args[0] != "--format":
            args = ["--format", "gguf", *args]
        monkeypatch.setattr(sys, "argv", ["compressdit", "export", *args, "--out", str(tmp_path / "x.gguf")])
        with pytest.raises(SystemExit) as exit_info:
            main()
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_read_gguf_rebuilds_the_float_model_from_either_names(tmp_path):
    from compressdit.io.gguf_read import read_gguf

    paths = {names: tmp_path / f"flux-{names}.gguf" for names in ("original", "diffusers")}
    for names, path in paths.items():
        export_gguf(FLUX, path, "Q8_0", names=names)
    assert _field(paths["original"], "general.architecture") == "flux"
    assert "3072" in export_gguf(FLUX, tmp_path / "again.gguf", "Q8_0", names="original").note
    original, layers = read_gguf(paths["original"])
    diffusers_named, same_layers = read_gguf(paths["diffusers"])
    assert layers == same_layers and "single_transformer_blocks.0.proj_mlp" in layers
    assert "x_embedder" not in layers and "proj_out" not in layers  # embedder / head stay float
    tensors = _read(paths["diffusers"])
    for name, tensor in original.state_dict().items():  # the split original tensors are gguf's decoding
        assert torch.equal(tensor, diffusers_named.state_dict()[name]), name
        assert np.array_equal(tensor.numpy(), tensors[name][1].reshape(tensor.shape)), name
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf file")
    with pytest.raises(CheckpointError, match="bad.gguf"):
        read_gguf(tmp_path / "bad.gguf")


def test_k_quants_fall_back_as_llama_cpp_for_narrow_rows(tmp_path):
    """flux-fmnist is 128 wide: only the 512-input MLP down projections fill 256-wide super-blocks; the other
    linears take llama.cpp's fallback Q5_0, the fp16-stored embedders / head F16, 1-D tensors F32."""
    types = export_gguf(FLUX, tmp_path / "flux-Q4_K.gguf", "Q4_K").tensor_types
    assert types["transformer_blocks.0.ff.net.2.weight"] == "Q4_K"
    assert types["transformer_blocks.0.attn.to_q.weight"] == "Q5_0"
    assert types["single_transformer_blocks.0.proj_out.weight"] == "Q5_0"  # 640 inputs
    assert types["x_embedder.weight"] == "F16" and types["proj_out.bias"] == "F32"
    assert _field(tmp_path / "flux-Q4_K.gguf", "general.file_type") == gguf.LlamaFileType.MOSTLY_Q4_K_M

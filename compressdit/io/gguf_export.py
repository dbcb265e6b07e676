"""GGUF export of a transformer: ``compressdit export SRC --format gguf --quant Q8_0 --out FILE.gguf``.

The source is a float diffusers model or a compressdit checkpoint, whose layers are dequantized first; every
2-D linear weight is then re-quantized with the ``gguf`` package's block quantizers (llama.cpp's formats, read
by diffusers' ``GGUFQuantizationConfig`` and ComfyUI-GGUF). As the GGUF converters do (city96's ``convert.py``
and its llama.cpp patch), 1-D tensors and tensors of at most 1024 elements are written as F32, and the layers
kept in full precision (the adapter's ``keep_full_precision`` roles: embedders and head, plus layers a
compressdit checkpoint left unquantized) in the float type the source stores (F16 for a fp16 checkpoint);
a weight whose rows do not fill 256-wide K-quant blocks takes llama.cpp's fallback (Q4_K -> Q5_0,
Q5_K -> Q5_1), and one that does not fill 32-wide blocks stays float. Families with an original layout (FLUX:
BFL's names, ``general.architecture = flux``; SD3: SAI's MMDiT names, ``sd3``) are written in it by default
when diffusers' converter rebuilds the model from it (FLUX: only at FLUX.1's width; ComfyUI also assumes the
released geometry, which the export's ``note`` flags); the others, or
``names="diffusers"``, get diffusers' own names (``general.architecture = diffusers``), which
``from_single_file`` loads unconverted for the classes that have it.

Example::

    compressdit export zoo:flux-fmnist --format gguf --quant Q8_0 --out flux-fmnist-Q8_0.gguf
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from compressdit.errors import CheckpointError, ConfigError, UnsupportedModelError
from compressdit.io.checkpoint import check_writable, stored_float_dtype, write_failure
from compressdit.io.diffusers_quantizer import FLOAT_DTYPES
from compressdit.io.gguf_kquants import K_QUANTIZERS
from compressdit.io.sources import TRANSFORMER_SUBFOLDER, load_transformer, resolve_path
from compressdit.models import adapter_for
from compressdit.models.base import ModelAdapter, OriginalTensor
from compressdit.quant.transform import quantized_modules

SMALL_TENSOR = 1024  # at most this many elements: F32, as the GGUF converters keep them
NAMES = ("original", "diffusers")
_FLOAT_TYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
_BLOCK_TYPES = ("Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0", "Q5_K", "Q4_K")
_FILE_TYPES = {"F32": "ALL_F32", "Q5_K": "MOSTLY_Q5_K_M", "Q4_K": "MOSTLY_Q4_K_M"}  # else MOSTLY_<quant>
# llama.cpp's fallback (``llama_tensor_get_type``) for rows that do not fill 256-wide K-quant super-blocks
_K_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1"}


def quant_types() -> tuple[str, ...]:
    """``--quant`` values: float types, and the block types this ``gguf`` package (or compressdit) can write."""
    import gguf  # here and below: only the GGUF export path loads the gguf package

    writable = []
    for name in _BLOCK_TYPES:
        qtype = gguf.GGMLQuantizationType[name]
        try:
            gguf.quants.quantize(np.zeros((1, gguf.GGML_QUANT_SIZES[qtype][0]), np.float32), qtype)
        except NotImplementedError:
            if name not in K_QUANTIZERS:
                continue
        writable.append(name)
    return ("F32", "F16", "BF16", *writable)


def quantize_array(array: np.ndarray, qtype_name: str) -> np.ndarray:
    """``gguf.quants.quantize``, or compressdit's K-quant writer where the ``gguf`` package has none."""
    import gguf

    qtype = gguf.GGMLQuantizationType[qtype_name]
    try:
        return gguf.quants.quantize(array, qtype)
    except NotImplementedError:
        return K_QUANTIZERS[qtype_name](array)


@dataclass
class GGUFExport:
    """What was written: the file, its tensor naming and architecture, and each tensor's GGML type."""

    path: Path
    arch: str
    names: str
    model_class: str
    tensor_types: dict[str, str] = field(default_factory=dict)
    note: str | None = None  # why stock loaders may not read the file (a small model in original names)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for qtype in self.tensor_types.values():
            out[qtype] = out.get(qtype, 0) + 1
        return out


def load_float_transformer(model: str) -> tuple[nn.Module, set[str], torch.dtype]:
    """The source's transformer with float weights (a compressdit checkpoint's layers dequantized), the names of
    the layers that checkpoint had quantized (empty for a float source) and the dtype its float tensors are
    stored in (kept tensors are written in it: the fp16 of a fp16 checkpoint, not its float32 in memory)."""
    folder = resolve_path(model)
    if (folder / TRANSFORMER_SUBFOLDER / "config.json").exists():
        folder = folder / TRANSFORMER_SUBFOLDER
    transformer = load_transformer(folder)
    quantized = set(quantized_modules(transformer))
    recorded = getattr(getattr(getattr(transformer, "hf_quantizer", None), "quantization_config", None),
                       "pre_quantization_dtype", None)
    float_dtype = FLOAT_DTYPES[recorded] if recorded else None if quantized else stored_float_dtype(folder)
    if getattr(transformer, "hf_quantizer", None) is not None:
        transformer.dequantize()
    return transformer, quantized, float_dtype or torch.float32


def _stock_config(transformer: nn.Module) -> dict:
    """The model's diffusers config without compressdit's ``quantization_config`` or where it was loaded from."""
    return {k: v for k, v in transformer.config.items() if k not in ("quantization_config", "_name_or_path", "_pre_quantization_dtype")}


def _stock_state_shapes(transformer: nn.Module) -> dict[str, torch.Size]:
    from accelerate import init_empty_weights

    with init_empty_weights():
        stock = type(transformer).from_config(_stock_config(transformer))
    return {k: v.shape for k, v in stock.state_dict().items()}


def _check_stock_layout(transformer: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """GGUF loaders build the stock model from its config: a structure it cannot express (width pruning, MoE) fails."""
    stock = _stock_state_shapes(transformer)
    for name, tensor in state.items():
        if stock.get(name) != tensor.shape:
            expected = "no such tensor" if name not in stock else f"shape {list(stock[name])}"
            raise CheckpointError(f"tensor {name} has shape {list(tensor.shape)} but the stock "
                                  f"{type(transformer).__name__} of this config has {expected}: GGUF loaders build "
                                  "the stock model, so width-pruned or MoE checkpoints cannot be exported to GGUF")


def _layout(adapter: ModelAdapter, transformer: nn.Module, names: str,
            state: dict[str, torch.Tensor]) -> dict[str, OriginalTensor]:
    if names == "diffusers":
        return {name: OriginalTensor((name,)) for name in state}
    layout = adapter.original_layout(transformer.config)
    used = [source for tensor in layout.values() for source in tensor.sources]
    unused = sorted(set(state) - set(used))
    absent = sorted(set(used) - set(state))
    if unused or absent:
        what = f"tensor {unused[0]} has no place" if unused else f"tensor {absent[0]} is missing"
        raise CheckpointError(f"{type(transformer).__name__}: {what} in the original {adapter.original_arch} layout; "
                              "export with --names diffusers")
    return layout


def _build(spec: OriginalTensor, state: dict[str, torch.Tensor]) -> torch.Tensor:
    tensor = torch.cat([state[s] for s in spec.sources]) if len(spec.sources) > 1 else state[spec.sources[0]]
    if spec.swap_halves:
        first, second = tensor.chunk(2)
        tensor = torch.cat([second, first])
    return tensor


def _quantizable(spec: OriginalTensor, adapter: ModelAdapter, linears: set[str], keep: set[str]) -> bool:
    """Every source is the weight of a linear that is neither in a full-precision role nor kept float by ours."""
    for source in spec.sources:
        module = source.removesuffix(".weight")
        if module == source or module not in linears or module in keep:
            return False
        if adapter.role_of(module) in adapter.keep_full_precision:
            return False
    return True


def tensor_type(tensor: torch.Tensor, quantizable: bool, quant: str, float_type: str = "F32") -> str:
    """The GGML type a tensor is written in: ``quant`` where its rows fill whole blocks (K-quants fall back to
    Q5_0 / Q5_1 as llama.cpp does), else ``float_type``; 1-D and small tensors F32."""
    import gguf

    if tensor.dim() < 2 or tensor.numel() <= SMALL_TENSOR:
        return "F32"
    if quant in _FLOAT_TYPES.values():
        return quant
    if not quantizable:
        return float_type
    for candidate in (quant, _K_FALLBACK.get(quant)):
        if candidate and tensor.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[candidate]][0] == 0:
            return candidate
    return float_type


@torch.no_grad()
def export_gguf(model: str, out: Path, quant: str = "Q8_0", names: str | None = None,
                overwrite: bool = False) -> GGUFExport:
    """Write ``model``'s transformer to the GGUF file ``out`` (atomically); see the module docstring."""
    import gguf

    if quant not in quant_types():
        raise ConfigError(f"--quant {quant}: the installed gguf {_gguf_version()} writes {', '.join(quant_types())}")
    if names is not None and names not in NAMES:
        raise ConfigError(f"--names {names}: expected one of {', '.join(NAMES)}")
    out = Path(out)
    if out.exists() and (out.is_dir() or not overwrite):
        raise CheckpointError(f"output {out} already exists" + ("" if out.is_dir() else " (use --overwrite)"))
    check_writable(out)
    transformer, quantized, float_dtype = load_float_transformer(model)
    adapter = adapter_for(transformer)
    model_class = type(transformer).__name__
    if not hasattr(type(transformer), "from_single_file"):
        raise UnsupportedModelError(f"{model_class} has no GGUF loader in diffusers (from_single_file) nor in "
                                    "ComfyUI-GGUF; GGUF export covers FLUX, SD3, Wan and the other single-file classes")
    original = adapter.original_arch is not None and adapter.diffusers_reads_original(transformer.config)
    names = names or ("original" if original else "diffusers")
    issue = adapter.original_geometry_issue(transformer.config) if names == "original" else None
    state = {k: v.detach().cpu() for k, v in transformer.state_dict().items()}
    _check_stock_layout(transformer, state)
    layout = _layout(adapter, transformer, names, state)
    arch = adapter.original_arch if names == "original" else "diffusers"
    linears = set(adapter.linear_layers(transformer))
    keep = linears - quantized if quantized else set()
    result = GGUFExport(out, arch, names, model_class, note=issue)
    writer_path = _temp_path(out)
    try:
        writer = gguf.GGUFWriter(str(writer_path), arch=arch)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_file_type(gguf.LlamaFileType[_FILE_TYPES.get(quant, f"MOSTLY_{quant}")])
        writer.add_string("compressdit.names", names)
        writer.add_string("diffusers.model_class", model_class)
        writer.add_string("diffusers.config", json.dumps(_stock_config(transformer), default=str))
        for name, spec in layout.items():
            tensor = _build(spec, state)
            qtype = tensor_type(tensor, _quantizable(spec, adapter, linears, keep), quant, _FLOAT_TYPES[float_dtype])
            array = tensor.float().numpy()
            writer.add_tensor(name, quantize_array(array, qtype), raw_dtype=gguf.GGMLQuantizationType[qtype])
            result.tensor_types[name] = qtype
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(writer_path, 0o666 & ~umask)  # mkstemp's 0600 is not what a written model file should have
        os.replace(writer_path, out)
    except OSError as exc:  # a short write (a full disk) has no error number: any OSError here is the writing's
        raise CheckpointError(f"cannot write {out}: {write_failure(exc) or exc} (nothing was written); free space "
                              "or choose another --out") from None
    finally:
        writer_path.unlink(missing_ok=True)
    return result


def _temp_path(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    os.close(handle)
    return Path(name)


def _gguf_version() -> str:
    from importlib.metadata import version

    return version("gguf")

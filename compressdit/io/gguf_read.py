"""Read a GGUF file written by ``compressdit export --format gguf`` back into a float diffusers transformer.

Every tensor is dequantized with the ``gguf`` package's own reader (``gguf.quants.dequantize``), original names
(FLUX / SD3) are split back with the adapter's layout (at any width, unlike diffusers' FLUX converter, which
assumes FLUX.1's), and the model is built from the
``diffusers.config`` the export stores. ``compressdit evaluate FILE.gguf --reference ...`` scores the export so,
in the same report columns as any checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from compressdit.errors import CheckpointError, ModelNotFoundError
from compressdit.models import adapter_for

FLOAT_TYPES = ("F32", "F16", "BF16")


def _field(reader, key: str, path: Path) -> str:
    field = reader.get_field(key)
    if field is None:
        raise CheckpointError(f"{path} has no {key} metadata: not a transformer GGUF written by compressdit export")
    return field.contents()


def _split(state: dict[str, torch.Tensor], layout: dict, shapes: dict[str, torch.Tensor],
           path: Path) -> dict[str, torch.Tensor]:
    """Diffusers tensors from original ones: undo the half swap, split fused tensors by their sources' rows."""
    out = {}
    for name, spec in layout.items():
        if name not in state:
            raise CheckpointError(f"{path} lacks tensor {name} of the original layout")
        tensor = state[name]
        if spec.swap_halves:
            first, second = tensor.chunk(2)
            tensor = torch.cat([second, first])
        rows = [shapes[s].shape[0] for s in spec.sources]
        for source, part in zip(spec.sources, tensor.split(rows)):
            out[source] = part.reshape(shapes[source].shape)
    return out


def read_gguf(path: str | Path) -> tuple[nn.Module, list[str]]:
    """The float transformer ``path`` holds, and the diffusers names of the linears it stores quantized."""
    import diffusers
    import gguf  # only `compressdit export/evaluate` on a GGUF file reads it

    path = Path(path)
    if not path.is_file():
        raise ModelNotFoundError(f"GGUF file {path} does not exist")
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as exc:
        raise CheckpointError(f"cannot read {path} as GGUF ({exc})") from None
    class_name = _field(reader, "diffusers.model_class", path)
    config = json.loads(_field(reader, "diffusers.config", path))
    names = _field(reader, "compressdit.names", path)
    state, quantized = {}, set()
    for tensor in reader.tensors:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        state[tensor.name] = torch.from_numpy(values.reshape(tuple(reversed(tensor.shape.tolist()))).copy())
        if tensor.tensor_type.name not in FLOAT_TYPES:
            quantized.add(tensor.name)
    model_class = getattr(diffusers, class_name)
    with torch.device("meta"):
        model = model_class.from_config(config)
    layout = None
    if names == "original":
        layout = adapter_for(model).original_layout(model.config)
        state = _split(state, layout, model.state_dict(), path)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: tensors do not fit {class_name} of its stored config "
                              f"({str(exc).strip().splitlines()[0]})") from None
    sources = {name: layout[name].sources if layout else (name,) for name in quantized}
    layers = sorted({s.removesuffix(".weight") for name in quantized for s in sources[name]})
    return model.float().eval(), layers

"""Shard-wise checkpoint reading and writing, for models larger than memory.

:class:`LazyWeights` reads the tensors a caller names from a diffusers folder's safetensors files (one file or
shards plus ``diffusion_pytorch_model.safetensors.index.json``), opening each file only for that read, so that
nothing stays mapped between reads. :class:`ShardWriter` writes a state dict whose tensors arrive a few at a
time (one transformer block after another) into the shards that diffusers' own ``save_pretrained`` would write
for the same state dict and ``max_shard_size`` (``huggingface_hub.split_torch_state_dict_into_shards``): a shard
is written as soon as its last tensor arrives, and the index last. Stock ``from_pretrained`` loads the result::

    layout = plan_shards(meta_model.state_dict(), "1GB")
    with ShardWriter(folder, layout, metadata) as writer:
        for block_tensors in produce():
            writer.add(block_tensors)
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from pathlib import Path

import torch
from huggingface_hub import StateDictSplit, split_torch_state_dict_into_shards
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from compressdit.errors import CheckpointError

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
_FLOAT = ("F64", "F32", "F16", "BF16")


@contextlib.contextmanager
def _opened(path: Path) -> Iterator:
    """``safe_open(path)``; any failure to read it (header or tensor) is one :class:`CheckpointError` naming it."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            yield handle
    except (OSError, RuntimeError, ValueError, SafetensorError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"cannot read {path} ({first}): a truncated or corrupt shard") from None


class LazyWeights:
    """The tensors of a diffusers model folder, read on demand (``read``) without loading the rest."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        index = self.folder / INDEX_NAME
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise CheckpointError(f"{index} is not a valid shard index (no weight_map)") from None
            self.files = {name: self.folder / file for name, file in weight_map.items()}
        elif (self.folder / WEIGHTS_NAME).exists():
            with _opened(self.folder / WEIGHTS_NAME) as handle:
                self.files = {name: self.folder / WEIGHTS_NAME for name in handle.keys()}
        else:
            raise CheckpointError(f"{self.folder} has neither {WEIGHTS_NAME} nor {INDEX_NAME}")
        missing = sorted({str(p.name) for p in self.files.values() if not p.exists()})
        if missing:
            raise CheckpointError(f"{self.folder}: shard {missing[0]} listed in the index is missing")

    def names(self) -> list[str]:
        return list(self.files)

    def read(self, names: list[str], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The named tensors (floating ones cast to ``dtype`` when given), one file opened at a time."""
        absent = [n for n in names if n not in self.files]
        if absent:
            raise CheckpointError(f"{self.folder}: the model needs tensor {absent[0]} but the weights lack it "
                                  f"({len(absent)} missing): config.json and weights do not match")
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.files[name], []).append(name)
        out = {}
        for path, file_names in by_file.items():
            with _opened(path) as handle:
                for name in file_names:
                    tensor = handle.get_tensor(name)
                    out[name] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
        return out

    def load_into(self, module: torch.nn.Module, names: list[str], like: dict[str, torch.Tensor], prefix: str = "",
                  strict: bool = False, device: torch.device | str = "cpu") -> None:
        """Read the tensors ``names`` (full names) into ``module``, the submodule at ``prefix``, on ``device``: each
        must have the shape of its twin in ``like`` (the ``meta`` state dict config.json defines) and takes its
        dtype (what an in-memory load gives); ``strict``: ``names`` are all of ``module``'s tensors."""
        tensors = self.read(names)
        for name, tensor in tensors.items():
            if tensor.shape != like[name].shape:
                raise CheckpointError(f"tensor {name} has shape {list(tensor.shape)} in the weights but config.json "
                                      f"implies {list(like[name].shape)}: config.json and weights do not match")
        strip = len(prefix) + 1 if prefix else 0
        module.load_state_dict({n[strip:]: t.to(device, like[n].dtype) if t.is_floating_point() else t.to(device)
                                for n, t in tensors.items()}, strict=strict, assign=True)

    def float_numel(self) -> int:
        """Floating-point elements in the checkpoint (what an in-memory load materialises in its float dtype)."""
        total = 0
        for path in sorted(set(self.files.values())):
            with _opened(path) as handle:
                for name in handle.keys():
                    view = handle.get_slice(name)
                    if view.get_dtype() in _FLOAT:
                        total += math.prod(view.get_shape())
        return total


def plan_shards(meta_state_dict: dict[str, torch.Tensor], max_shard_size: int | str) -> StateDictSplit:
    """Which output tensor goes to which file: ``save_pretrained``'s own split of the (``meta``) state dict."""
    return split_torch_state_dict_into_shards(meta_state_dict, max_shard_size=max_shard_size,
                                              filename_pattern=WEIGHTS_NAME.replace(".safetensors",
                                                                                    "{suffix}.safetensors"))


class ShardWriter:
    """Writes the tensors of ``layout`` to ``folder`` shard by shard as they arrive (see the module doc).

    ``expected`` maps every tensor name to its ``(shape, dtype)``; an arriving tensor that is not expected, or
    differs from it, is an error, as is closing with tensors still missing (nothing is then indexed).
    """

    def __init__(self, folder: Path, layout: StateDictSplit, expected: dict[str, tuple[tuple, torch.dtype]],
                 metadata: dict[str, str] | None = None) -> None:
        self.folder, self.layout, self.expected = Path(folder), layout, expected
        self.metadata = {"format": "pt", **{k: str(v) for k, v in (metadata or {}).items()}}
        self.pending: dict[str, dict[str, torch.Tensor]] = {}
        self.written: list[str] = []
        self.produced: set[str] = set()

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, tensor in tensors.items():
            if name not in self.layout.tensor_to_filename:
                raise CheckpointError(f"tensor {name} is not part of the planned checkpoint")
            if name in self.produced:
                raise CheckpointError(f"tensor {name} was already produced")
            shape, dtype = self.expected[name]
            if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
                raise CheckpointError(f"tensor {name} is {tuple(tensor.shape)} {tensor.dtype}, the planned "
                                      f"checkpoint expects {tuple(shape)} {dtype}")
            file = self.layout.tensor_to_filename[name]
            self.pending.setdefault(file, {})[name] = tensor.detach().cpu().contiguous()  # from any device
            self.produced.add(name)
            if len(self.pending[file]) == len(self.layout.filename_to_tensors[file]):
                save_file(self.pending.pop(file), str(self.folder / file), metadata=self.metadata)
                self.written.append(file)

    def pending_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for shard in self.pending.values() for t in shard.values())

    def close(self) -> None:
        """Check every shard was written, then write the index (sharded layouts) the way diffusers does."""
        if self.pending or len(self.written) != len(self.layout.filename_to_tensors):
            missing = sorted(set(self.layout.tensor_to_filename) - self.produced)
            raise CheckpointError(f"checkpoint incomplete: tensor {missing[0]} was never produced "
                                  f"({len(missing)} missing)")
        if self.layout.is_sharded:
            metadata = {**self.layout.metadata, **{k: v for k, v in self.metadata.items() if k != "format"}}
            index = {"metadata": metadata, "weight_map": self.layout.tensor_to_filename}
            (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    def __enter__(self) -> "ShardWriter":
        self.folder.mkdir(parents=True, exist_ok=True)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()


def expected_tensors(state_dict: dict[str, torch.Tensor]) -> dict[str, tuple[tuple, torch.dtype]]:
    """``name -> (shape, dtype)`` of a (``meta``) state dict, for :class:`ShardWriter`."""
    return {name: (tuple(t.shape), t.dtype) for name, t in state_dict.items()}


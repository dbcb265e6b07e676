"""Checkpoint files: integrity checks and atomic output folders (temp dir, then rename)."""

from __future__ import annotations

import collections
import contextlib
import errno
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

import torch
from safetensors import safe_open

from compressdit.errors import CheckpointError


def verify_safetensors(folder: Path) -> list[Path]:
    """Open every ``*.safetensors`` header and check its byte size; raise on corrupt or truncated files."""

    files = sorted(folder.glob("*.safetensors"))
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if index.exists():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (json.JSONDecodeError, KeyError):
            raise CheckpointError(f"{index} is not a valid shard index") from None
        missing = sorted(s for s in shards if not (folder / s).exists())
        if missing:
            raise CheckpointError(f"{folder}: shard {missing[0]} listed in the index is missing")
    if not files:
        raise CheckpointError(f"{folder} has no .safetensors weights")
    for path in files:
        with path.open("rb") as handle:
            raw = handle.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path} is truncated (no safetensors header)")
        header_len = int.from_bytes(raw, "little")
        end = _declared_data_end(path, header_len)  # checked first: safe_open calls truncation "corrupt"
        if end is not None and path.stat().st_size < 8 + header_len + end:
            raise CheckpointError(f"{path} is truncated: {path.stat().st_size} bytes, header needs "
                                  f"{8 + header_len + end}")
        try:
            with safe_open(str(path), framework="pt") as handle:
                list(handle.keys())
        except Exception as exc:
            raise CheckpointError(f"{path} is corrupt ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})")\
                from None
    return files


def _declared_data_end(path: Path, header_len: int) -> int | None:
    """End offset of the tensor data the header declares; ``None`` when the header itself is unreadable."""
    if header_len > path.stat().st_size - 8:
        return None
    try:
        with path.open("rb") as handle:
            handle.seek(8)
            header = json.loads(handle.read(header_len))
        return max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except Exception:
        return None


def folder_bytes(folder: Path, pattern: str = "*.safetensors") -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob(pattern))


def check_writable(out: Path) -> None:
    """Raise unless ``out``'s temporary sibling can be created: its nearest existing ancestor is a folder this
    process may write (probed with a folder made and removed at once; permission bits say nothing for root)."""
    existing = next(p for p in Path(os.path.abspath(out)).parents if p.exists())
    if not existing.is_dir():
        raise CheckpointError(f"cannot write {out}: {existing} is a file, not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".compressdit-probe-", dir=existing))
    except OSError as exc:
        raise CheckpointError(f"cannot write {out}: {existing} is not writable ({exc.strerror}); "
                              "choose another --out") from None


def check_output(out: Path, overwrite: bool = False, keep: Iterable[str | Path | None] = ()) -> None:
    """Raise unless ``out`` can be written: absent, an empty folder, or ``overwrite`` is set, in a folder this
    process may write, and neither one of the run's inputs ``keep`` (local paths; other names, such as ``zoo:`` or
    hub ones, and ``None`` are passed over) nor a folder holding one: the output takes the place of the folder it
    names, so ``--out MODEL --overwrite`` would have replaced the model being compressed."""
    out = Path(out)
    target = Path(os.path.abspath(out.expanduser())).resolve()
    for path in keep:
        given = None if path is None else Path(path).expanduser()
        if given is not None and given.exists():
            found = given.resolve()
            if found == target or target in found.parents:
                what = "the input" if found == target else "a folder holding the input"
                raise CheckpointError(f"--out {out} is {what} {path}: the output replaces it; choose another --out")
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"output path {out} exists and is a file, not a folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise CheckpointError(f"output folder {out} already exists and is not empty (use --overwrite)")
    check_writable(out)


WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


def write_failure(exc: BaseException) -> str | None:
    """The reason (``No space left on device``, ...) when ``exc`` is a failed write of the output, else None;
    ``shutil.copytree`` (a ``shutil.Error``) and safetensors' writer (``SafetensorError``) keep the error
    number only in their text."""
    code = exc.errno if isinstance(exc, OSError) and not isinstance(exc, shutil.Error) else None
    if code is None:
        found = re.search(r"\[Errno (\d+)\]|os error (\d+)", str(exc))
        code = int(found.group(1) or found.group(2)) if found else None
    return os.strerror(code) if code in WRITE_ERRORS else None


@contextlib.contextmanager
def atomic_output(out: Path, overwrite: bool = False, keep: Iterable[str | Path | None] = ()) -> Iterator[Path]:
    """Yield a temp folder next to ``out``; on success it replaces ``out``, on error it is deleted (``keep``: the
    inputs it must not replace, :func:`check_output`)."""
    out = Path(out)
    check_output(out, overwrite, keep)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = write_failure(exc)
        if reason is None:
            raise
        raise CheckpointError(f"cannot write {out}: {reason} (nothing was written); free space or choose another "
                              "--out") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


# loose files a pipeline needs; anything else at the top (a model card, metrics, samples, training facts)
# describes the source model, not the one written next to it
PIPELINE_FILES = ("model_index.json",)


def copy_pipeline_parts(source_folder: Path, out: Path, skip: tuple[str, ...] = ("transformer", "report")) -> None:
    """Copy a pipeline's other components (VAE, scheduler, ... folders) and ``model_index.json`` next to a new
    transformer; files describing the source model (``MODEL_CARD.md``, ``metrics.json``, ...) are not copied."""
    for item in Path(source_folder).iterdir():
        if item.name in skip or item.name.startswith(("compressdit_", ".")):
            continue
        if item.is_file() and item.name not in PIPELINE_FILES and not item.name.upper().startswith("LICENSE"):
            continue
        target = Path(out) / item.name
        if item.is_dir():
            shutil.copytree(item, target)
        else:
            shutil.copy2(item, target)


def stored_float_dtype(folder: Path) -> torch.dtype | None:
    """The floating dtype most of a checkpoint folder's tensors are stored in (by bytes), or None."""
    return files_float_dtype(Path(folder).glob("*.safetensors"))


def files_float_dtype(paths: Iterable[Path | str]) -> torch.dtype | None:
    """The floating dtype most of these safetensors files' tensors are stored in (by bytes), or None."""
    sizes: collections.Counter = collections.Counter()
    for path in paths:
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                sl = handle.get_slice(key)
                dtype = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}.get(sl.get_dtype())
                if dtype is not None:
                    sizes[dtype] += math.prod(sl.get_shape())
    return max(sizes, key=sizes.get) if sizes else None

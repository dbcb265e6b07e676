"""Tests for compressdit.io.checkpoint: safetensors integrity checks and atomic output folders."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from compressdit.errors import CheckpointError
from compressdit.io import checkpoint
from compressdit.io.checkpoint import atomic_output, check_output, folder_bytes, verify_safetensors, write_failure

WEIGHTS = "diffusion_pytorch_model.safetensors"


def _write(folder, name=WEIGHTS, **tensors):
    folder.mkdir(parents=True, exist_ok=True)
    tensors = tensors or {"a": torch.arange(64, dtype=torch.float32).reshape(8, 8), "b": torch.ones(16)}
    save_file(tensors, str(folder / name))
    return folder / name


def test_valid_folder_passes(tmp_path):
    path = _write(tmp_path)
    assert verify_safetensors(tmp_path) == [path]
    assert folder_bytes(tmp_path) == path.stat().st_size


@pytest.mark.parametrize("keep", [4, 8, 40, -20])
def test_truncated_file_is_a_checkpoint_error(tmp_path, keep):
    path = _write(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:keep] if keep > 0 else data[:keep])
    with pytest.raises(CheckpointError, match=rf"{WEIGHTS} is (truncated|corrupt)"):
        verify_safetensors(tmp_path)


@pytest.mark.parametrize("payload", [b"this is not json at all!", b"{\"a\": {\"dtype\": \"F32\"}}  "])
def test_garbage_header_is_a_checkpoint_error(tmp_path, payload):
    (tmp_path / WEIGHTS).write_bytes(struct.pack("<Q", len(payload)) + payload + b"\0" * 32)
    with pytest.raises(CheckpointError, match=rf"{WEIGHTS} is corrupt"):
        verify_safetensors(tmp_path)


def test_absurd_header_length_is_a_checkpoint_error(tmp_path):
    (tmp_path / WEIGHTS).write_bytes(struct.pack("<Q", 2 ** 60) + b"{}" + b"\0" * 32)
    with pytest.raises(CheckpointError, match="corrupt|truncated"):
        verify_safetensors(tmp_path)


def test_missing_shard_from_index_is_a_checkpoint_error(tmp_path):
    first = "diffusion_pytorch_model-00001-of-00002.safetensors"
    second = "diffusion_pytorch_model-00002-of-00002.safetensors"
    _write(tmp_path, first)
    (tmp_path / f"{WEIGHTS}.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"a": first, "b": second}}))
    with pytest.raises(CheckpointError, match=f"shard {second} listed in the index is missing"):
        verify_safetensors(tmp_path)
    _write(tmp_path, second, c=torch.zeros(3))
    assert len(verify_safetensors(tmp_path)) == 2


def test_broken_index_and_empty_folder_are_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no .safetensors weights"):
        verify_safetensors(tmp_path)
    _write(tmp_path)
    (tmp_path / f"{WEIGHTS}.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not a valid shard index"):
        verify_safetensors(tmp_path)


def test_atomic_output_publishes_only_on_success(tmp_path):
    out = tmp_path / "nested" / "out"
    with atomic_output(out) as tmp:
        assert tmp != out and tmp.parent == out.parent and tmp.is_dir()
        (tmp / "config.json").write_text("{}")
        assert not out.exists()
    assert (out / "config.json").read_text() == "{}"
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]


def test_atomic_output_removes_temp_dir_on_error_and_leaves_no_output(tmp_path):
    out = tmp_path / "out"
    seen = {}
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_output(out) as tmp:
            seen["tmp"] = tmp
            (tmp / "partial.safetensors").write_bytes(b"half")
            raise RuntimeError("boom")
    assert not seen["tmp"].exists()
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(KeyboardInterrupt):  # an interrupt cleans up too
        with atomic_output(out) as tmp:
            seen["tmp"] = tmp
            raise KeyboardInterrupt
    assert not seen["tmp"].exists() and list(tmp_path.iterdir()) == []


def test_atomic_output_refuses_non_empty_output_without_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(CheckpointError, match="already exists and is not empty"):
        with atomic_output(out):
            pytest.fail("must refuse before yielding")
    assert (out / "keep.txt").read_text() == "precious"
    # a failed overwrite keeps the old folder
    with pytest.raises(RuntimeError):
        with atomic_output(out, overwrite=True):
            raise RuntimeError("fail")
    assert (out / "keep.txt").read_text() == "precious"
    with atomic_output(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    # an existing empty folder is not "in use"
    empty = tmp_path / "empty"
    empty.mkdir()
    with atomic_output(empty) as tmp:
        (tmp / "x").write_text("x")
    assert (empty / "x").exists()


def test_output_under_a_file_is_refused_before_any_work(tmp_path):
    """``--out some-file/out`` used to fail only when the run wrote, as ``FileExistsError: [Errno 17]``."""
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(CheckpointError, match="a-file is a file, not a folder"):
        check_output(tmp_path / "a-file" / "deeper" / "out")


def test_output_in_an_unwritable_folder_is_refused_and_leaves_nothing(tmp_path, monkeypatch):
    """Permission bits say nothing for root, so the check makes (and removes) a probe folder; a folder it
    cannot write (read-only mount, /proc) is refused with the reason. The probe's failure is simulated."""
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    check_output(tmp_path / "new" / "out")  # a missing parent is fine: it is made when the run writes
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # the probe left nothing behind
    monkeypatch.setattr(checkpoint.tempfile, "mkdtemp", refuse)
    with pytest.raises(CheckpointError, match="is not writable .Permission denied.; choose another --out"):
        check_output(tmp_path / "out")


def _full_disk_errors(tmp_path):
    import errno
    import shutil

    from safetensors import SafetensorError

    target = str(tmp_path / ".out.tmp-x" / "model.safetensors")
    return [OSError(errno.ENOSPC, "No space left on device"),
            shutil.Error([("src", target, f"[Errno 28] No space left on device: 'src' -> '{target}'")]),
            SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")]


@pytest.mark.parametrize("which", ["OSError", "copytree", "safetensors"])
def test_a_full_disk_is_one_clear_error_and_leaves_nothing(tmp_path, which):
    """A full disk used to surface as shutil.Error's list of tuples (temp paths included) or as a safetensors
    traceback; every writer's form is now one line naming the output and the reason."""
    exc = _full_disk_errors(tmp_path)[["OSError", "copytree", "safetensors"].index(which)]
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=r"cannot write .*out: No space left on device \(nothing was written\)"):
        with atomic_output(out):
            raise exc
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_other_errors_inside_an_output_pass_through(tmp_path):
    """Only write failures are reworded: a missing input file keeps its own error."""
    assert write_failure(FileNotFoundError(2, "No such file or directory")) is None
    with pytest.raises(FileNotFoundError):
        with atomic_output(tmp_path / "out"):
            raise FileNotFoundError(2, "No such file or directory")
    assert not (tmp_path / "out").exists()

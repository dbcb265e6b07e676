"""Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package, padded to 32x32 in [-1, 1]."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

FMNIST_DIR_ENV = "COMPRESSDIT_FMNIST_DIR"
DEFAULT_FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASS_NAMES = (
    "t-shirt", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
)
IMAGE_SIZE = 32


class DatasetMissingError(FileNotFoundError):
    """Raised when the Fashion-MNIST files are not installed."""


def fmnist_dir() -> Path:
    return Path(os.environ.get(FMNIST_DIR_ENV, DEFAULT_FMNIST_DIR))


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        raw = handle.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_fmnist(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(images [N,1,32,32] float32 in [-1,1], labels [N] int64)`` for ``train`` or ``test``."""
    prefix = {"train": "train", "test": "t10k"}[split]
    root = fmnist_dir()
    images_path = root / f"{prefix}-images-idx3-ubyte.gz"
    labels_path = root / f"{prefix}-labels-idx1-ubyte.gz"
    if not images_path.exists() or not labels_path.exists():
        raise DatasetMissingError(
            f"Fashion-MNIST not found in {root}: run `apt-get install -y dataset-fashion-mnist` "
            f"or set {FMNIST_DIR_ENV}"
        )
    images = torch.from_numpy(_read_idx(images_path).copy()).float().div_(127.5).sub_(1.0)
    images = torch.nn.functional.pad(images, (2, 2, 2, 2), value=-1.0).unsqueeze(1)
    labels = torch.from_numpy(_read_idx(labels_path).astype(np.int64))
    return images, labels

"""Calibration sets: class-label and caption lists in ``calibration/*.jsonl``, loaded with ``datasets``."""

from __future__ import annotations

from pathlib import Path

from compressdit.errors import ConfigError

CALIBRATION_DIR = Path(__file__).resolve().parents[2] / "calibration"
DEFAULT_SETS = {"class": "fmnist-classes", "text": "fmnist-captions"}


def resolve_set(name_or_path: str | None, condition_kind: str) -> Path:
    """A shipped set name (``fmnist-classes``) or a user's ``.jsonl`` file."""
    name = name_or_path or DEFAULT_SETS[condition_kind]
    path = Path(name)
    if path.suffix == ".jsonl" or path.exists():
        if not path.is_file():
            raise ConfigError(f"calibration file {path} does not exist")
        return path
    shipped = CALIBRATION_DIR / f"{name}.jsonl"
    if not shipped.is_file():
        known = ", ".join(sorted(p.stem for p in CALIBRATION_DIR.glob("*.jsonl"))) or "none"
        raise ConfigError(f"unknown calibration set {name!r}; shipped sets: {known}; or pass a .jsonl path")
    return shipped


def load_conditions(path: Path, condition_kind: str, limit: int | None = None) -> list:
    """Rows of ``{"class_id": int}`` for class-conditional models or ``{"prompt": str}`` for text ones."""
    import datasets
    from datasets import load_dataset

    column = {"class": "class_id", "text": "prompt"}[condition_kind]
    bars_were_off = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # a "Generating train split" bar for a small local file is only noise
    try:
        rows = load_dataset("json", data_files=str(path), split="train")
    except Exception as exc:  # datasets raises several types for malformed files
        raise ConfigError(f"cannot read calibration file {path}: {exc}".splitlines()[0]) from None
    finally:
        if not bars_were_off:
            datasets.enable_progress_bars()
    if column not in rows.column_names:
        raise ConfigError(f"calibration file {path} has no {column!r} field (columns: {rows.column_names}); "
                          f"a {condition_kind}-conditioned model needs one {column!r} per line")
    values = list(rows[column])
    if not values:
        raise ConfigError(f"calibration file {path} is empty")
    if condition_kind == "class" and not all(isinstance(v, int) and 0 <= v < 1000 for v in values):
        raise ConfigError(f"calibration file {path}: class_id values must be integers in [0, 1000)")
    if limit is not None:
        values = (values * (limit // len(values) + 1))[:limit]
    return values

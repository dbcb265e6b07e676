"""Calibration sets: shipped class-label and caption lists (``calibration/*.jsonl``) or a user's local file or
folder (jsonl / json / parquet / csv with a ``prompt`` or ``class_id`` column), loaded with ``datasets``."""

from __future__ import annotations

from pathlib import Path

from compressdit.errors import ConfigError

CALIBRATION_DIR = Path(__file__).resolve().parents[2] / "calibration"
DEFAULT_SETS = {"class": "fmnist-classes", "text": "fmnist-captions"}
# file suffix -> ``datasets`` packaged builder
BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def resolve_set(name_or_path: str | None, condition_kind: str) -> Path:
    """A shipped set name (``fmnist-classes``) or a user's file (``.jsonl``, ``.parquet``, ``.csv``) or folder."""
    name = name_or_path or DEFAULT_SETS[condition_kind]
    path = Path(name).expanduser()
    if path.suffix in BUILDERS or path.exists():
        if not path.exists():
            raise ConfigError(f"calibration file {path} does not exist")
        return path
    shipped = CALIBRATION_DIR / f"{name}.jsonl"
    if not shipped.is_file():
        known = ", ".join(sorted(p.stem for p in CALIBRATION_DIR.glob("*.jsonl"))) or "none"
        raise ConfigError(f"unknown calibration set {name!r}; shipped sets: {known}; or pass a .jsonl, .parquet or "
                          ".csv file or a folder of them")
    return shipped


def _data_files(path: Path) -> tuple[str, list[str]]:
    """The ``datasets`` builder and data files for a file, or for a folder holding files of one format."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in BUILDERS
                                                 and not p.name.startswith("."))
    builders = {BUILDERS.get(p.suffix) for p in files}
    if not files or None in builders:
        raise ConfigError(f"calibration set {path}: expected a .jsonl, .json, .parquet or .csv file"
                          + (" or a folder of them" if path.is_dir() else ""))
    if len(builders) > 1:
        raise ConfigError(f"calibration folder {path} mixes formats ({', '.join(sorted(builders))}): keep one")
    return builders.pop(), [str(p) for p in files]


def set_bytes(path: Path) -> int:
    """Bytes of a calibration file or folder (part of calibration cache keys)."""
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def load_conditions(path: Path, condition_kind: str, limit: int | None = None) -> list:
    """The ``class_id`` column for class-conditional models or the ``prompt`` column for text ones."""
    import datasets
    from datasets import load_dataset

    column = {"class": "class_id", "text": "prompt"}[condition_kind]
    builder, files = _data_files(Path(path))
    bars_were_off = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # a "Generating train split" bar for a small local file is only noise
    try:
        rows = load_dataset(builder, data_files=files, split="train")
    except Exception as exc:  # datasets raises several types for malformed files
        raise ConfigError(f"cannot read calibration file {path}: {exc}".splitlines()[0]) from None
    finally:
        if not bars_were_off:
            datasets.enable_progress_bars()
    if column not in rows.column_names:
        raise ConfigError(f"calibration file {path} has no {column!r} field (columns: {rows.column_names}); "
                          f"a {condition_kind}-conditioned model needs one {column!r} per row")
    values = list(rows[column])
    if not values:
        raise ConfigError(f"calibration file {path} is empty")
    if condition_kind == "class" and not all(isinstance(v, int) and 0 <= v < 1000 for v in values):
        raise ConfigError(f"calibration file {path}: class_id values must be integers in [0, 1000)")
    if condition_kind == "text" and not all(isinstance(v, str) for v in values):
        raise ConfigError(f"calibration file {path}: prompt values must be text (found a missing or non-text one)")
    if limit is not None:
        values = (values * (limit // len(values) + 1))[:limit]
    return values

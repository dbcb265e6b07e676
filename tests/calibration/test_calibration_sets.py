"""User calibration sets (compressdit.calibration.sets): parquet / csv / jsonl files and folders via ``datasets``."""

from __future__ import annotations

import pytest

from compressdit.calibration.sets import load_conditions, resolve_set
from compressdit.errors import ConfigError


def _write_prompts(path, fmt, prompts):
    import datasets

    data = datasets.Dataset.from_dict({"prompt": prompts, "extra": list(range(len(prompts)))})
    {"parquet": data.to_parquet, "csv": data.to_csv, "jsonl": data.to_json}[fmt](str(path))
    return path


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl"])
def test_prompt_sets_from_parquet_csv_and_jsonl_files(tmp_path, fmt):
    path = _write_prompts(tmp_path / f"prompts.{fmt}", fmt, ["a red fox, at dusk", "a bag"])
    assert resolve_set(str(path), "text") == path
    assert load_conditions(path, "text") == ["a red fox, at dusk", "a bag"]
    assert load_conditions(path, "text", limit=3) == ["a red fox, at dusk", "a bag", "a red fox, at dusk"]
    with pytest.raises(ConfigError, match="has no 'class_id' field"):
        load_conditions(path, "class")


def test_calibration_folder_reads_every_file_of_one_format(tmp_path):
    folder = tmp_path / "set"
    folder.mkdir()
    _write_prompts(folder / "a.parquet", "parquet", ["one", "two"])
    _write_prompts(folder / "b.parquet", "parquet", ["three"])
    assert resolve_set(str(folder), "text") == folder
    assert sorted(load_conditions(folder, "text")) == ["one", "three", "two"]
    _write_prompts(folder / "c.csv", "csv", ["four"])
    with pytest.raises(ConfigError, match="mixes formats"):
        load_conditions(folder, "text")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("hi")
    with pytest.raises(ConfigError, match="expected a .jsonl, .json, .parquet or .csv file or a folder of them"):
        load_conditions(empty, "text")


def test_class_ids_from_csv_and_prompts_must_be_text(tmp_path):
    path = tmp_path / "ids.csv"
    path.write_text("class_id\n3\n7\n")
    assert load_conditions(path, "class") == [3, 7]
    numbers = tmp_path / "numbers.csv"
    numbers.write_text("prompt\n3\n")
    with pytest.raises(ConfigError, match="prompt values must be text"):
        load_conditions(numbers, "text")
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_set(str(tmp_path / "nope.parquet"), "text")

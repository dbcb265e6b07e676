"""Resolving a MODEL argument: what a user passes by mistake gets one clear error."""

from __future__ import annotations

import json
import shutil

import pytest

from compressdit.errors import CheckpointError
from compressdit.io.sources import load_source, transformer_class


def test_a_pipeline_folder_without_its_transformer_says_so(dit_pipeline_dir, tmp_path):
    """It used to read "has no config.json: not a diffusers model folder", which sends a user looking for the
    wrong thing; the error names the pipeline's components instead."""
    folder = tmp_path / "pipe"
    shutil.copytree(dit_pipeline_dir, folder)
    shutil.rmtree(folder / "transformer")
    components = sorted(k for k in json.loads((folder / "model_index.json").read_text()) if not k.startswith("_"))
    with pytest.raises(CheckpointError, match="pipeline folder without transformer/config.json") as caught:
        load_source(str(folder))
    assert all(name in str(caught.value) for name in components)


def test_a_folder_that_is_no_model(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(CheckpointError, match="has no config.json: not a diffusers model folder"):
        transformer_class(tmp_path)

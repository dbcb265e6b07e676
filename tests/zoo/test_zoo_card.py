"""Tests for the reference-model card (compressdit.zoo.card) and the zoo's card facts."""

from __future__ import annotations

import json

from compressdit.zoo.card import write_card
from compressdit.zoo.registry import ZOO
from tests.conftest import save_dit_pipeline

METRICS = {"cfg_4": {"class_accuracy": 0.9, "fd_fmnist_vs_test": 120.0}}


def test_card_states_objective_sampler_and_metrics(tmp_path):
    folder = save_dit_pipeline(tmp_path / "pipe")
    training = {"steps": 10, "batch_size": 8, "train_seconds": 60.0, "objective": "flow matching, velocity target"}
    text = write_card(folder, "tiny: a test model", "DiT, 2 blocks", "class ids", METRICS, training).read_text()
    assert text.startswith("# tiny: a test model")
    assert "flow matching, velocity target; 1.0 min on CPU" in text
    assert "- sampling: DPM-Solver++ 20 steps" in text  # from the pipeline's scheduler class
    assert "| cfg_4 | 0.900 | 120.000 |" in text
    assert json.loads((folder / "metrics.json").read_text()) == METRICS
    default = write_card(folder, "t", "a", "c", METRICS, {"steps": 1, "batch_size": 1}).read_text()
    assert "epsilon prediction, linear betas" in default


def test_flux_reference_has_card_facts():
    assert ZOO.get("flux-fmnist").card is not None
    assert ZOO.get("flux-fmnist").card.title.startswith("flux-fmnist")

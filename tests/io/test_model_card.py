"""The output folder's own model card (compressdit.io.model_card) and what is (not) copied from the reference."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from compressdit.io.checkpoint import copy_pipeline_parts, folder_bytes
from compressdit.io.model_card import CARD_NAME, write_model_card
from compressdit.models import adapter_for
from compressdit.pipeline import run_recipe
from compressdit.prune.depth import remove_blocks
from compressdit.quant.spec import LinearQuantSpec
from compressdit.quant.transform import LayerRule, quantize_layers, resolve_plan
from compressdit.io.diffusers_quantizer import attach_quantizer
from compressdit.recipe import Recipe
from tests.conftest import tiny_dit

REFERENCE_FILES = {"MODEL_CARD.md": "# dit-fmnist reference card", "metrics.json": '{"cfg_4": 1}',
                   "samples.png": "not really a png", "training.json": '{"steps": 9}', "README.md": "reference"}

RECIPE = {"version": 1, "name": "card-w4", "description": "RTN W4 g32 weights, embedders and head in float.",
          "stages": [{"quantize": {"method": "rtn", "rules": [
              {"match": "role:embedder", "spec": None}, {"match": "role:head", "spec": None},
              {"match": "re:.*", "spec": {"w_bits": 4, "group_size": 32}}]}}]}


@pytest.fixture()
def reference_with_card(dit_pipeline_dir, tmp_path) -> Path:
    """The tiny DiT pipeline plus the files a zoo model carries about itself, and a license."""
    folder = tmp_path / "reference"
    shutil.copytree(dit_pipeline_dir, folder)
    for name, text in REFERENCE_FILES.items():
        (folder / name).write_text(text)
    (folder / "LICENSE").write_text("the reference's license")
    return folder


def test_copy_pipeline_parts_leaves_out_files_about_the_reference(reference_with_card, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    copy_pipeline_parts(reference_with_card, out)
    assert sorted(p.name for p in out.iterdir()) == ["LICENSE", "model_index.json", "scheduler", "vae"]
    assert (out / "vae" / "config.json").exists()


def test_run_recipe_writes_the_compressed_models_card(reference_with_card, tmp_path):
    out = tmp_path / "w4"
    state = run_recipe(Recipe.from_dict(RECIPE), str(reference_with_card), out, quiet=True)
    assert not any((out / name).exists() for name in REFERENCE_FILES if name != CARD_NAME)
    card = (out / CARD_NAME).read_text()
    assert REFERENCE_FILES["MODEL_CARD.md"] not in card
    assert card.startswith(f"# card-w4 of {reference_with_card}")
    assert RECIPE["description"] in card and "Stages: quantize" in card
    assert f"- quantized: {len(state.quant_specs)} linear layers" in card
    assert f"int W4A16 g32: {len(state.quant_specs)} layers, 4 code bits per weight" in card
    assert "- kept in full precision: " in card and "proj_out_1" in card
    assert "pruning: none" in card
    size, reference_size = folder_bytes(out / "transformer"), folder_bytes(reference_with_card / "transformer")
    assert size < reference_size and f"{size:,} bytes (reference {reference_size:,} bytes" in card
    assert "Not evaluated" in card
    assert "import compressdit" in card and f'DiTPipeline.from_pretrained("{out}"' in card


def test_card_lists_pruning_and_the_reports_metrics(dit_model_dir, tmp_path):
    model = tiny_dit()
    remove_blocks(model, adapter_for(model), {"transformer_blocks": [1]})
    plan = resolve_plan(model, adapter_for(model), [LayerRule("role:attn_qkv", LinearQuantSpec(w_bits=8, a_bits=8))])
    quantize_layers(model, plan)
    attach_quantizer(model, {n: s for n, s in plan.items() if s is not None})
    folder = tmp_path / "pruned"
    model.save_pretrained(folder)
    report = {"columns": ["candidate", "reference", "baseline"], "candidate": "pruned W8A8",
              "reference": "tiny DiT (uncompressed)", "baseline": "recipe rtn-w8a8",
              "metrics": [{"name": "class accuracy", "unit": "", "better": "higher",
                           "values": {"candidate": 0.8125, "reference": 0.875, "baseline": 0.75}},
                          {"name": "PSNR vs reference (same seeds)", "unit": "dB", "better": "higher",
                           "values": {"candidate": 21.5, "reference": None, "baseline": 19.25}}]}
    recipe = Recipe.from_dict({**RECIPE, "name": "prune-quantize"})
    write_model_card(folder, display_path="out/pq", recipe=recipe, reference_name="tiny", reference_folder=dit_model_dir,
                     model=model, report=report)
    card = (folder / CARD_NAME).read_text()
    assert "`num_layers` 2 → 1" in card
    assert "int W8A8: 3 layers, 8 code bits per weight" in card
    assert "| metric | candidate | reference | baseline |" in card
    assert "| class accuracy | 0.8125 | 0.8750 | 0.7500 |" in card
    assert "| PSNR vs reference (same seeds) [dB] | 21.500 | — | 19.250 |" in card
    assert "- baseline: recipe rtn-w8a8" in card
    assert 'DiTTransformer2DModel.from_pretrained("out/pq", torch_dtype=torch.float32)' in card
    assert json.loads((folder / "config.json").read_text())["num_layers"] == 1

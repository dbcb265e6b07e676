"""Tests for the ``prune_width`` stage: config, magnitude and Taylor on a tiny DiT pipeline, Flux, reload, recipes."""

from __future__ import annotations

from dataclasses import replace

from pathlib import Path

import pytest
import torch

from compressdit.errors import ConfigError
from compressdit.io.sources import load_source
from compressdit.models import ADAPTERS
from compressdit.models.text_conditions import synthetic_text
from compressdit.pipeline import run_recipe, save_checkpoint
from compressdit.prune.width import WidthConfig, prune_width
from compressdit.recipe import Recipe, load_recipe
from compressdit.stages import STAGES, PipelineState
from compressdit.stages.evaluate import reference_named_layers
from compressdit.stages.prune_width import PruneWidthConfig, calibration_batches
from compressdit.zoo.data import fmnist_dir
from tests.conftest import folder_state, save_dit_pipeline, tiny_flux

torch.set_num_threads(1)
DIT, FLUX = ADAPTERS.get("dit"), ADAPTERS.get("flux")
needs_fmnist = pytest.mark.skipif(not (fmnist_dir() / "train-images-idx3-ubyte.gz").exists(),
                                  reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
HALF = {"ffn_ratio": 0.25, "head_ratio": 0.5}  # tiny DiT: 256 -> 192 MLP channels, 2 -> 1 heads per block
TAYLOR = {**HALF, "importance": "taylor", "batches": 2, "batch_size": 4, "data": {"source": "fmnist", "images": 16}}


def _recipe(*stages: dict) -> Recipe:
    return Recipe.from_dict({"version": 1, "name": "w", "stages": list(stages)})


def _predict(adapter, model, seed: int = 3) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, *adapter.latent_shape(model), generator=gen)
    cond = [1, 7] if adapter is DIT else synthetic_text(2, 5, model.config.joint_attention_dim,
                                                           model.config.pooled_projection_dim)
    with torch.no_grad():
        return adapter.predict(model, x, torch.tensor([500.0]), adapter.encode(model, cond))


def _shapes(model) -> list[tuple[int, int]]:
    return [(b.attn1.heads, b.ff.net[2].in_features) for b in model.transformer_blocks]


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory) -> Path:
    return save_dit_pipeline(tmp_path_factory.mktemp("prune-width") / "pipe", layers=2)


# config -----------------------------------------------------------------------------------------------------


def test_recipe_parses_and_round_trips() -> None:
    recipe = _recipe({"prune_width": {**TAYLOR, "roles": ["ffn_up"], "seed": 3}})
    config = recipe.stage("prune_width").config
    assert isinstance(config, PruneWidthConfig) and isinstance(config, WidthConfig)
    assert (config.importance, config.batches, config.data.options.images, config.seed, config.roles) == (
        "taylor", 2, 16, 3, ["ffn_up"])
    assert Recipe.from_dict(recipe.to_dict()) == recipe


@pytest.mark.parametrize("data, message", [
    ({**HALF, "ratio": 0.3}, "unknown key 'ratio'"),
    ({"ffn_ratio": 1.0}, r"prune_width\.ffn_ratio: must be in \[0, 1\), got 1.0"),
    ({"head_ratio": -0.1}, r"head_ratio: must be in \[0, 1\)"),
    ({}, "nothing to prune; set ffn_ratio and/or head_ratio above 0"),
    ({**HALF, "importance": "hessian"}, "importance: unknown 'hessian'; known: magnitude, taylor"),
    ({**HALF, "batches": 0}, "batches: must be positive, got 0"),
    ({**HALF, "batch_size": -4}, "batch_size: must be positive"),
    ({**HALF, "data": {"source": "fmnist", "images": 0}}, "data.images: must be positive or null"),
    ({**HALF, "condition_dropout": 1.0}, r"condition_dropout: must be in \[0, 1\)"),
    ({**HALF, "roles": ["attn_out"]}, "'attn_out' cannot be width-pruned"),
])
def test_bad_configs_are_one_line_config_errors(data: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        _recipe({"prune_width": data})
    assert "stages[0].prune_width" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("name, importance, baseline", [("width-30", "taylor", "width-30-magnitude"),
                                                        ("width-30-magnitude", "magnitude", None)])
def test_shipped_recipes(name: str, importance: str, baseline: str | None) -> None:
    recipe = load_recipe(name)
    assert [s.name for s in recipe.stages] == ["prune_width", "distill", "evaluate"]
    prune = recipe.stage("prune_width").config
    assert (prune.ffn_ratio, prune.head_ratio, prune.importance) == (0.3, 0.3, importance)
    assert (prune.batches, prune.batch_size) == (8, 64)
    distill, depth = recipe.stage("distill").config, load_recipe("tinyfusion-50").stage("distill").config
    assert replace(distill, steps=depth.steps) == depth  # the same distillation but for its length
    assert recipe.stage("evaluate").config.baseline == baseline
    if baseline:
        load_recipe(baseline)


# magnitude ---------------------------------------------------------------------------------------------------


def test_magnitude_recipe_prunes_and_reloads_with_stock_diffusers(pipeline_dir: Path, tmp_path: Path) -> None:
    from diffusers import DiTTransformer2DModel

    import compressdit  # noqa: F401  (registers the loader backend, as a user would)

    expected = load_source(str(pipeline_dir)).transformer
    prune_width(expected, DIT, WidthConfig(**HALF))
    state = run_recipe(_recipe({"prune_width": HALF}), str(pipeline_dir), tmp_path / "out", quiet=True)
    assert _shapes(state.model) == [(1, 192), (1, 192)]
    assert all(torch.equal(a, b) for a, b in zip(state.model.state_dict().values(), expected.state_dict().values()))
    assert state.notes[0].startswith("prune_width (magnitude, ffn_ratio 0.25, head_ratio 0.5): parameters ")
    assert "ffn_up: 128/512 channels removed in 2 MLPs; attn_qkv: 2/4 heads removed in 2 attentions" in state.notes[0]
    assert state.tables[0]["header"] == ["unit", "role", "kind", "before", "after"]
    assert state.tables[0]["rows"] == [row for i in range(2) for row in (
        [f"transformer_blocks.{i}.ff.net.0.proj", "ffn_up", "ffn", 256, 192],
        [f"transformer_blocks.{i}.attn1", "attn_qkv", "heads", 2, 1])]
    assert state.timings["prune_width_s"] >= 0
    reloaded = DiTTransformer2DModel.from_pretrained(tmp_path / "out" / "transformer")
    assert _shapes(reloaded) == [(1, 192), (1, 192)]
    assert torch.equal(_predict(DIT, reloaded), _predict(DIT, state.model))


def test_flux_joint_and_single_blocks_prune_and_reload(tmp_path: Path) -> None:
    from diffusers import FluxTransformer2DModel

    tiny_flux(1, 2, 4, 384, 384).save_pretrained(tmp_path / "flux")  # MiniLM width: the reload check encodes ""
    source = load_source(str(tmp_path / "flux"))
    state = PipelineState(source=source, adapter=FLUX, model=source.transformer, workdir=tmp_path / "out",
                          reference_spec=str(tmp_path / "flux"), quiet=True, cache_dir=tmp_path)
    stage = STAGES.get("prune_width")
    stage.run(state, stage.parse(HALF, "prune_width"))
    model = state.model
    double, singles = model.transformer_blocks[0], model.single_transformer_blocks
    assert double.attn.heads == 2 and double.attn.add_q_proj.out_features == double.attn.to_add_out.in_features == 32
    assert double.ff.net[2].in_features == double.ff_context.net[2].in_features == 192
    assert all(b.attn.heads == 2 and b.proj_out.in_features == 32 + 192 for b in singles)
    assert "context: 64/256 channels removed in 1 MLP;" in state.notes[0]
    assert "attn_qkv: 6/12 heads removed in 3 attentions" in state.notes[0]
    save_checkpoint(state, _recipe({"prune_width": HALF}))
    assert state.notes[-1].startswith("stock diffusers reload check: max |output difference| = 0")
    reloaded = FluxTransformer2DModel.from_pretrained(tmp_path / "out")
    assert torch.equal(_predict(FLUX, reloaded), _predict(FLUX, model))


def test_width_pruning_after_quantize_is_refused(pipeline_dir: Path, tmp_path: Path) -> None:
    state = folder_state(pipeline_dir, tmp_path)
    state.quant_specs = {"transformer_blocks.0.attn1.to_q": object()}
    stage = STAGES.get("prune_width")
    with pytest.raises(ConfigError, match="put prune_width before quantize") as info:
        stage.run(state, stage.parse(HALF, "prune_width"))
    assert "\n" not in str(info.value) and _shapes(state.model) == [(2, 256), (2, 256)]


def test_no_selected_unit_is_a_config_error(pipeline_dir: Path, tmp_path: Path) -> None:
    state, stage = folder_state(pipeline_dir, tmp_path), STAGES.get("prune_width")
    with pytest.raises(ConfigError, match="no unit of roles"):
        stage.run(state, stage.parse({"ffn_ratio": 0.25, "roles": ["attn_qkv"]}, "prune_width"))


def test_layer_sqnr_leaves_out_reshaped_layers(pipeline_dir: Path, tmp_path: Path) -> None:
    state, stage = folder_state(pipeline_dir, tmp_path), STAGES.get("prune_width")
    stage.run(state, stage.parse(HALF, "prune_width"))
    state.quant_specs = dict.fromkeys(["transformer_blocks.0.ff.net.2", "transformer_blocks.0.attn1.to_q",
                                       "transformer_blocks.0.norm1.linear"])
    assert reference_named_layers(state) == ["transformer_blocks.0.norm1.linear"]


# taylor ------------------------------------------------------------------------------------------------------


@needs_fmnist
def test_calibration_batches_are_seeded_draws_with_diffusion_targets(pipeline_dir: Path, tmp_path: Path) -> None:
    state = folder_state(pipeline_dir, tmp_path)
    config = PruneWidthConfig.from_dict(TAYLOR)
    first, again = list(calibration_batches(state, config)), list(calibration_batches(state, config))
    assert len(first) == 2 and len(list((tmp_path / "distill-data").glob("fmnist-latents-*-16.pt"))) == 1
    for a, b in zip(first, again):
        assert a.latents.shape == a.target.shape == (4, 4, 8, 8) and a.timestep.shape == (4,)
        assert torch.equal(a.latents, b.latents) and torch.equal(a.target, b.target)
    assert not torch.equal(first[0].latents, first[1].latents)


@needs_fmnist
def test_taylor_is_seeded_and_chooses_otherwise_than_magnitude(pipeline_dir: Path, tmp_path: Path) -> None:
    stage = STAGES.get("prune_width")
    runs = []
    for data in (TAYLOR, TAYLOR, HALF):
        state = folder_state(pipeline_dir, tmp_path)
        flags = [p.requires_grad for p in state.model.parameters()]
        rng = torch.get_rng_state()
        stage.run(state, stage.parse(data, "prune_width"))
        assert torch.equal(torch.get_rng_state(), rng)
        assert all(p.grad is None for p in state.model.parameters())
        assert [p.requires_grad for p in state.model.parameters()] == flags
        assert _shapes(state.model) == [(1, 192), (1, 192)]
        runs.append(state)
    taylor, repeat, magnitude = (s.model.state_dict() for s in runs)
    assert all(torch.equal(taylor[k], repeat[k]) for k in taylor)
    assert any(not torch.equal(taylor[k], magnitude[k]) for k in taylor)
    assert runs[0].notes[0].endswith("taylor scores from 2 batches x 4 noised latents (MSE to the diffusion "
                                     "target, seed 0)")
    assert runs[0].notes[1].startswith("prune_width data: 16 Fashion-MNIST training images encoded by the VAE")


@needs_fmnist
def test_width_pruned_student_distils_and_reloads(pipeline_dir: Path, tmp_path: Path) -> None:
    from diffusers import DiTTransformer2DModel

    distill = {"steps": 2, "batch_size": 4, "data": {"source": "fmnist", "images": 16}, "lr": 1e-3, "warmup": 1}
    state = run_recipe(_recipe({"prune_width": TAYLOR}, {"distill": distill}), str(pipeline_dir), tmp_path / "out",
                       quiet=True)
    assert "feature layer map student<-teacher: 0<-0, 1<-1" in state.notes[2]
    reloaded = DiTTransformer2DModel.from_pretrained(tmp_path / "out" / "transformer")
    assert _shapes(reloaded) == [(1, 192), (1, 192)]
    assert torch.equal(_predict(DIT, reloaded), _predict(DIT, state.model))

"""Tests for compressdit.distill.sources: the ``data`` key, data-free teacher samples (cached), user images."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from compressdit.calibration.sets import load_conditions, resolve_set
from compressdit.distill.sources import DataSpec, load_data, set_data
from compressdit.distill.teacher_data import TeacherDataConfig
from compressdit.errors import ConfigError
from compressdit.io.sources import load_source
from compressdit.models import ADAPTERS, adapter_for
from compressdit.models.sampling import sample
from compressdit.stages.distill import DistillStageConfig, data_context
from compressdit.zoo.data import load_fmnist
from tests.conftest import save_dit_pipeline, tiny_pixart

torch.set_num_threads(1)
DIT, PIXART = ADAPTERS.get("dit"), ADAPTERS.get("pixart")
TEACHER = {"source": "teacher", "images": 6, "steps": 2, "guidance": 1.0, "batch_size": 4}


# the data key -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value, expected", [
    (None, {"source": "auto", "images": None}),
    ("teacher", {"source": "teacher", **TeacherDataConfig().to_dict()}),
    ("fmnist", {"source": "fmnist", "images": None}),
    ({"source": "fmnist", "images": 16}, {"source": "fmnist", "images": 16}),
    ("images:/data/shirts", {"source": "images", "path": "/data/shirts", "images": None, "image_column": "image",
                             "condition_column": None, "batch_size": 32}),
])
def test_data_key_forms_parse_and_round_trip(value, expected):
    config = DistillStageConfig.from_dict({"data": value})
    assert config.data.to_dict() == expected
    assert DistillStageConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("value, message", [
    ("mnist", r"data\.source: unknown data source 'mnist'; known: auto, fmnist, images, teacher"),
    ("teacher:8", "a ':' argument fits only images:PATH"),
    ({"source": "images"}, r"data\.path: name an image folder"),
    ({"source": "fmnist", "path": "x"}, r"data: unknown key 'path'; allowed keys: images"),
    ({"source": "teacher", "steps": 0}, r"data\.steps: must be positive"),
    ({"source": "teacher", "guidance": 0.5}, r"data\.guidance: must be >= 1"),
    ({"source": "auto", "images": 0}, r"data\.images: must be positive or null"),
    (3, "expected a source name or a mapping"),
])
def test_bad_data_keys_are_config_errors(value, message):
    with pytest.raises(ConfigError, match=message):
        DistillStageConfig.from_dict({"data": value}, "distill")


def test_set_data_reaches_stage_and_method_configs():
    from compressdit.recipe import load_recipe

    recipe = load_recipe("tinyfusion-50")
    assert set_data([s.config for s in recipe.stages], "images:/x") == 2  # prune (tinyfusion) + distill
    assert recipe.stages[0].config.options.data.source == recipe.stages[1].config.data.source == "images"
    assert DataSpec.from_dict("teacher").with_images(8).options.images == 8


# teacher samples --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return load_source(str(save_dit_pipeline(tmp_path_factory.mktemp("data") / "pipe", layers=2)))


class CountingLoader:
    """Returns the teacher and counts how often it was asked for."""

    def __init__(self, model):
        self.model, self.calls = model, 0

    def __call__(self):
        self.calls += 1
        return self.model


def test_teacher_source_samples_the_teacher_and_caches(pipeline, tmp_path):
    loader = CountingLoader(pipeline.transformer)
    context = data_context(DIT, pipeline.transformer, pipeline, loader, tmp_path)
    spec = DataSpec.from_dict(TEACHER)
    data = load_data(spec, context)
    assert data.latents.shape == (6, 4, 8, 8) and loader.calls == 1
    classes = load_conditions(resolve_set(None, "class"), "class", limit=6)
    assert [data.conditions[label] for label in data.labels] == classes  # each latent keeps its class id
    expected = sample(DIT, pipeline.transformer, classes[4:6], pipeline.scheduler, steps=2, guidance=1.0, seed=4)
    torch.testing.assert_close(data.latents[4:6], expected)  # sample i is drawn from seed + i, whatever the batch
    assert "6 samples x 2 steps = 12 denoising steps" in data.note and "6 drawn now" in data.note
    (folder,) = (tmp_path / "distill-data").iterdir()
    assert sorted(p.name for p in folder.iterdir()) == ["part-0000000-0000004.safetensors",
                                                        "part-0000004-0000006.safetensors"]

    again = load_data(spec, context)  # cache hit: the teacher is not even loaded
    assert loader.calls == 1 and torch.equal(again.latents, data.latents) and "all reused" in again.note

    (folder / "part-0000004-0000006.safetensors").unlink()  # a run stopped mid-way resumes at the missing batch
    resumed = load_data(spec, context)
    assert loader.calls == 2 and "2 drawn now" in resumed.note and "4 reused" in resumed.note
    torch.testing.assert_close(resumed.latents, data.latents)

    other = load_data(DataSpec.from_dict({**TEACHER, "seed": 1}), context)  # other settings: another cache entry
    assert len(list((tmp_path / "distill-data").iterdir())) == 2 and not torch.equal(other.latents, data.latents)


def test_auto_is_the_teacher_for_models_outside_the_zoo(pipeline, tmp_path):
    context = data_context(DIT, pipeline.transformer, pipeline, lambda: pipeline.transformer, tmp_path)
    assert not context.is_zoo
    data = load_data(DataSpec.from_dict({"source": "auto", "images": 3}), context)
    assert data.note.startswith("teacher samples (data-free): 3 clean latents") and len(data.latents) == 3


def test_auto_keeps_fashion_mnist_for_the_zoo(tmp_path):  # Fashion-MNIST: Debian package, installed by .ci/run
    source = load_source("zoo:dit-fmnist")
    context = data_context(DIT, source.transformer, source, lambda: source.transformer, tmp_path)
    assert context.is_zoo
    data = load_data(DataSpec.from_dict({"source": "auto", "images": 16}), context)
    assert data.note.startswith("16 Fashion-MNIST training images encoded by the VAE in")
    assert data.conditions == list(range(10)) and data.labels.tolist() == load_fmnist("train")[1][:16].tolist()


def test_teacher_source_for_a_text_model_passes_prompts_to_its_encoder(tmp_path):
    tiny_pixart().save_pretrained(tmp_path / "pixart")  # a bare transformer folder: the adapter's scheduler
    source = load_source(str(tmp_path / "pixart"))
    context = data_context(PIXART, source.transformer, source, lambda: source.transformer, tmp_path / "cache")
    data = load_data(DataSpec.from_dict({**TEACHER, "images": 3}), context)
    prompts = load_conditions(resolve_set(None, "text"), "text", limit=3)
    assert data.latents.shape == (3, 4, 8, 8) and data.conditions == prompts and torch.isfinite(data.latents).all()


def test_teacher_source_embeds_prompts_with_the_models_own_encoder(tmp_path):
    """A T5-width model (32-d captions) with an embeddings file: the teacher samples, the condition vocabulary and
    the null condition go through it (never MiniLM), and the teacher cache is keyed by the encoder."""
    from compressdit.models.prompt_encoders import PROMPT_ENCODERS, save_prompt_embeddings
    from compressdit.models.text_conditions import TextEmbedding

    tiny_pixart(caption_channels=32).save_pretrained(tmp_path / "pixart")
    source = load_source(str(tmp_path / "pixart"))
    prompts = load_conditions(resolve_set(None, "text"), "text", limit=3)
    gen = torch.Generator().manual_seed(0)
    rows = [TextEmbedding(torch.randn(5, 32, generator=gen), torch.ones(5, dtype=torch.long)) for _ in range(4)]

    def encoder(seed_shift: float):
        path = save_prompt_embeddings(tmp_path / f"embeddings-{seed_shift}.safetensors", [*prompts, ""],
                                      [TextEmbedding(r.tokens + seed_shift, r.mask) for r in rows])
        return PROMPT_ENCODERS.get("embeddings")(path)

    first = encoder(0.0)
    context = data_context(PIXART, source.transformer, source, lambda: source.transformer, tmp_path / "cache",
                           prompt_encoder=first)
    assert context.prompt_encoder is first
    data = load_data(DataSpec.from_dict({**TEACHER, "images": 3, "guidance": 2.0}), context)
    assert all(isinstance(c, TextEmbedding) for c in data.conditions)
    assert [torch.equal(c.tokens, r.tokens) for c, r in zip(data.conditions, rows)] == [True] * 3
    assert torch.equal(data.null_condition.tokens, rows[3].tokens)
    expected = sample(PIXART, source.transformer, prompts, source.scheduler or PIXART.scheduler(source.transformer),
                      steps=2, guidance=2.0, batch_size=4, prompt_encoder=first)
    torch.testing.assert_close(data.latents, expected)
    context.prompt_encoder = encoder(1.0)  # other embeddings: other teacher samples, cached apart
    load_data(DataSpec.from_dict({**TEACHER, "images": 3, "guidance": 2.0}), context)
    assert len(list((tmp_path / "cache" / "distill-data").glob("teacher-*"))) == 2


# user images ------------------------------------------------------------------------------------------------


def _pngs(count: int, size: int = 20):
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    return [Image.fromarray((torch.rand(size, size, 3, generator=gen) * 255).to(torch.uint8).numpy())
            for _ in range(count)]


@torch.no_grad()
def _encoded(vae, image) -> torch.Tensor:
    """The reference encoding: Lanczos-resized to 32x32, grey, in [-1, 1], posterior mean, scaled."""
    import numpy as np
    from PIL import Image

    grey = torch.from_numpy(np.asarray(image.resize((32, 32), resample=Image.LANCZOS).convert("L"), dtype=np.float32))
    pixels = (grey.view(1, 1, 32, 32) / 255) * 2 - 1
    return vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor


def test_images_source_reads_a_folder_of_pngs(pipeline, tmp_path):
    for label, images in (("shirt", _pngs(2)), ("shoe", _pngs(3)[1:])):
        (tmp_path / "pngs" / label).mkdir(parents=True)
        for i, image in enumerate(images):
            image.save(tmp_path / "pngs" / label / f"{i}.png")
    context = data_context(DIT, pipeline.transformer, pipeline, lambda: None, tmp_path / "cache")
    data = load_data(DataSpec.from_dict(f"images:{tmp_path / 'pngs'}"), context)
    assert data.latents.shape == (4, 4, 8, 8)
    assert sorted(data.conditions[label] for label in data.labels) == [0, 0, 1, 1]  # class sub-folders
    assert f"4 images of {tmp_path / 'pngs'} (conditions: column 'label')" in data.note
    first = next(i for i, label in enumerate(data.labels) if data.conditions[label] == 0)
    torch.testing.assert_close(data.latents[first:first + 1], _encoded(pipeline.vae, _pngs(1)[0]))
    assert len(list((tmp_path / "cache" / "distill-data").iterdir())) == 1
    assert torch.equal(load_data(DataSpec.from_dict(f"images:{tmp_path / 'pngs'}"), context).latents, data.latents)


def test_images_source_reads_a_parquet_file_with_captions(pipeline, tmp_path):
    import datasets

    captions = ["a red shirt", "a blue shoe", "a red shirt"]
    rows = datasets.Dataset.from_dict({"image": _pngs(3), "caption": captions},
                                      features=datasets.Features({"image": datasets.Image(),
                                                                  "caption": datasets.Value("string")}))
    rows.to_parquet(tmp_path / "train.parquet")
    model = tiny_pixart()  # a text model reading the same 4x8x8 latents as the pipeline's VAE makes
    context = data_context(PIXART, model, pipeline, lambda: None, tmp_path / "cache")
    data = load_data(DataSpec.from_dict({"source": "images", "path": str(tmp_path / "train.parquet"), "images": 3}),
                     context)
    assert data.latents.shape == (3, 4, 8, 8) and data.conditions == ["a red shirt", "a blue shoe"]
    assert data.labels.tolist() == [0, 1, 0] and data.null_condition == PIXART.null_conditions(1)[0]


def test_images_source_resolves_paths_of_a_jsonl_file(pipeline, tmp_path):
    for i, image in enumerate(_pngs(2)):
        image.save(tmp_path / f"{i}.png")
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps({"file": f"{i}.png", "class_id": 3 + i}) + "\n"
                                                 for i in range(2)))
    context = data_context(DIT, pipeline.transformer, pipeline, lambda: None, tmp_path / "cache")
    data = load_data(DataSpec.from_dict({"source": "images", "path": str(tmp_path / "rows.jsonl"),
                                         "image_column": "file"}), context)
    assert data.conditions == [3, 4] and data.latents.shape == (2, 4, 8, 8)


@pytest.mark.parametrize("rows, options, message", [
    ({"image": "0.png", "caption": "a shirt"}, {}, r"none of the columns \['label', 'class_id', 'class'\]"),
    ({"image": "0.png", "label": "shirt"}, {}, "needs integer class ids"),
    ({"picture": "0.png", "label": 1}, {}, "no image column 'image'"),
    ({"image": "0.png", "label": 1}, {"condition_column": "cls"}, "no column 'cls'"),
])
def test_bad_image_datasets_are_config_errors(pipeline, tmp_path, rows, options, message):
    _pngs(1)[0].save(tmp_path / "0.png")
    (tmp_path / "rows.jsonl").write_text(json.dumps(rows) + "\n")
    context = data_context(DIT, pipeline.transformer, pipeline, lambda: None, tmp_path / "cache")
    with pytest.raises(ConfigError, match=message):
        load_data(DataSpec.from_dict({"source": "images", "path": str(tmp_path / "rows.jsonl"), **options}), context)


def test_images_source_needs_a_pipeline_vae_and_an_existing_path(pipeline, tmp_path):
    model = tiny_pixart()
    model.save_pretrained(tmp_path / "bare")
    source = load_source(str(tmp_path / "bare"))  # a bare transformer folder: no vae/
    context = data_context(adapter_for(source.transformer), model, source, lambda: None, tmp_path / "cache")
    with pytest.raises(ConfigError, match="needs the pipeline's VAE"):
        load_data(DataSpec.from_dict(f"images:{tmp_path}"), context)
    context = data_context(DIT, pipeline.transformer, pipeline, lambda: None, tmp_path / "cache")
    with pytest.raises(ConfigError, match="missing does not exist"):
        load_data(DataSpec.from_dict(f"images:{tmp_path / 'missing'}"), context)

"""A user's image dataset as training latents: loaded with ``datasets``, encoded by the pipeline's VAE, cached."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoModel
from diffusers.image_processor import VaeImageProcessor
from safetensors.torch import load_file, save_file

from compressdit.config_base import StrictConfig
from compressdit.distill.data import labelled_data
from compressdit.distill.source_registry import DATA_SOURCES, DataContext, DataSource, files_digest
from compressdit.errors import ConfigError
from compressdit.io.checkpoint import atomic_output

BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}  # datasets' builder per file
CONDITION_COLUMNS = {"text": ("caption", "text", "prompt"), "class": ("label", "class_id", "class")}


@dataclass
class ImagesDataConfig(StrictConfig):
    """Your own images, encoded by the pipeline's VAE. YAML::

        data: {source: images, path: /data/shirts, images: null, image_column: image, condition_column: null}

    ``path``: a folder of images (``datasets``' ``imagefolder``: class sub-folders give a ``label``, a
    ``metadata.jsonl``/``.csv`` gives captions) or a ``.parquet`` / ``.jsonl`` / ``.json`` / ``.csv`` file with an
    image column (images, or paths relative to the file) and a condition column: captions for text models,
    integer class ids for class models (default: the first of caption, text, prompt / label, class_id, class).
    ``images``: the first N rows (null: all). Images are resized and centre-cropped to the model's pixel size,
    encoded (posterior mean) and scaled as the pipeline's VAE expects: ``(z - shift_factor) * scaling_factor``;
    latents are cached per VAE, dataset and count.
    """

    path: str = ""
    images: int | None = None
    image_column: str = "image"
    condition_column: str | None = None
    batch_size: int = 32

    def validate(self, where: str) -> None:
        if not self.path:
            raise ConfigError(f"{where}.path: name an image folder or a .parquet/.jsonl/.csv file "
                              "(data: {source: images, path: ...})")
        if self.images is not None and self.images <= 0:
            raise ConfigError(f"{where}.images: must be positive or null, got {self.images}")
        self.require_positive(where, "batch_size")


def load_rows(config: ImagesDataConfig):
    """The dataset (``datasets.Dataset``) with a decoded image column, its first ``images`` rows."""
    import datasets

    path = Path(config.path).expanduser()
    if not path.exists():
        raise ConfigError(f"image dataset {path} does not exist")
    if not path.is_dir() and path.suffix not in BUILDERS:
        raise ConfigError(f"image dataset {path}: expected a folder or a file ending in {', '.join(BUILDERS)}")
    bars_were_off = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        rows = (datasets.load_dataset("imagefolder", data_dir=str(path), split="train") if path.is_dir() else
                datasets.load_dataset(BUILDERS[path.suffix], data_files=str(path), split="train"))
    except Exception as exc:  # datasets raises several types for malformed input
        raise ConfigError(f"cannot read image dataset {path}: {exc}".splitlines()[0]) from None
    finally:
        if not bars_were_off:
            datasets.enable_progress_bars()
    column = config.image_column
    if column not in rows.column_names:
        raise ConfigError(f"image dataset {path} has no image column {column!r} (columns: {rows.column_names}); "
                          "set data.image_column")
    if not isinstance(rows.features[column], datasets.Image):
        if rows.features[column] == datasets.Value("string"):  # file paths, relative to the data file
            base = path.parent
            rows = rows.map(lambda row: {column: str(base / row[column])})
        rows = rows.cast_column(column, datasets.Image())
    if config.images is not None:
        rows = rows.select(range(min(config.images, len(rows))))
    if not len(rows):
        raise ConfigError(f"image dataset {path} is empty")
    return rows


def condition_column(config: ImagesDataConfig, rows, kind: str) -> str:
    if config.condition_column is not None:
        if config.condition_column not in rows.column_names:
            raise ConfigError(f"image dataset {config.path} has no column {config.condition_column!r} (columns: "
                              f"{rows.column_names})")
        return config.condition_column
    found = next((c for c in CONDITION_COLUMNS[kind] if c in rows.column_names), None)
    if found is None:
        raise ConfigError(f"image dataset {config.path} has none of the columns {list(CONDITION_COLUMNS[kind])} that "
                          f"a {kind}-conditioned model reads (columns: {rows.column_names}); set "
                          "data.condition_column")
    return found


def _conditions(values: list, kind: str, where: str) -> list:
    if kind == "class" and not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise ConfigError(f"{where}: a class-conditional model needs integer class ids >= 0, got e.g. {values[0]!r}")
    if kind == "text" and not all(isinstance(v, str) for v in values):
        raise ConfigError(f"{where}: a text-conditioned model needs caption strings, got e.g. {values[0]!r}")
    return values


@torch.no_grad()
def encode_images(vae, images: list, height: int, width: int, batch_size: int) -> torch.Tensor:
    """Scaled latents of PIL ``images`` resized to cover ``height`` x ``width`` and centre-cropped to it (aspect
    ratio kept), as the transformer sees them."""
    channels = vae.config.in_channels
    processor = VaeImageProcessor(vae_scale_factor=2 ** (len(vae.config.block_out_channels) - 1),
                                  do_convert_grayscale=channels == 1, do_convert_rgb=channels == 3)
    device, dtype = next(vae.parameters()).device, next(vae.parameters()).dtype
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    out = []
    for start in range(0, len(images), batch_size):
        pixels = processor.preprocess(images[start:start + batch_size], height=height, width=width, resize_mode="crop")
        latents = vae.encode(pixels.to(device, dtype)).latent_dist.mean.float()
        out.append(((latents - shift) * vae.config.scaling_factor).cpu())
    return torch.cat(out)


def _load_image_data(config: ImagesDataConfig, context: DataContext):
    if context.pipeline_vae is None:
        raise ConfigError("data source images needs the pipeline's VAE to encode the images: pass a pipeline folder "
                          "(with vae/), not a bare transformer folder")
    kind = context.adapter.condition_kind
    rows = load_rows(config)
    column = condition_column(config, rows, kind)
    channels, height, width = context.adapter.latent_shape(context.model)
    key = json.dumps({"vae": files_digest(context.pipeline_vae), "rows": rows._fingerprint, "columns": [
        config.image_column, column], "shape": [channels, height, width]}, sort_keys=True)
    folder = context.cache_dir / "distill-data" / f"images-{hashlib.sha1(key.encode()).hexdigest()[:16]}"
    if not (folder / "latents.safetensors").exists():
        conditions = _conditions(list(rows[column]), kind, f"{config.path} column {column!r}")
        vae = AutoModel.from_pretrained(str(context.pipeline_vae), torch_dtype=torch.float32).eval()
        if vae.config.latent_channels != channels:
            raise ConfigError(f"the VAE in {context.pipeline_vae} makes {vae.config.latent_channels}-channel latents "
                              f"but the model reads {channels}: pass the model's own pipeline")
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        vae.to("cuda" if torch.cuda.is_available() else "cpu")
        latents = encode_images(vae, list(rows[config.image_column]), height * factor, width * factor,
                                config.batch_size)
        with atomic_output(folder, overwrite=True) as tmp:
            save_file({"latents": latents.contiguous()}, str(tmp / "latents.safetensors"))
            (tmp / "conditions.json").write_text(json.dumps(conditions))
    latents = load_file(str(folder / "latents.safetensors"))["latents"]
    conditions = json.loads((folder / "conditions.json").read_text())
    note = (f"{len(latents)} images of {config.path} (conditions: column {column!r}) encoded by the VAE in "
            f"{context.pipeline_vae} ({folder})")
    return labelled_data(latents, conditions, context.adapter.null_conditions(1)[0], note)


DATA_SOURCES.add("images", DataSource(ImagesDataConfig, _load_image_data, argument="path"))

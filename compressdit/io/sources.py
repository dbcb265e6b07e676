"""Resolve a MODEL argument (local folder, ``zoo:NAME`` or hub id) into loaded components."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import diffusers
import torch
from diffusers.utils import logging as diffusers_logging
from torch import nn

from compressdit.errors import CheckpointError, ModelNotFoundError, UnsupportedModelError
from compressdit.io.checkpoint import verify_safetensors
from compressdit.models import ADAPTERS, adapter_for
from compressdit.models.generic import is_diffusers_transformer
from compressdit.models.prompt_encoders import PromptEncoder, prompt_encoder_for

ZOO_DIR = Path(__file__).resolve().parents[1] / "zoo" / "weights"
TRANSFORMER_SUBFOLDER = "transformer"


@dataclass
class ModelSource:
    """A loaded transformer plus what sampling needs; ``folder`` is where it came from."""

    name: str
    folder: Path
    transformer: nn.Module
    vae: nn.Module | None = None
    scheduler: object | None = None
    is_pipeline: bool = False
    info: dict = field(default_factory=dict)
    prompt_encoder: PromptEncoder | None = None  # text models: embeds prompts (None: MiniLM in the adapter)

    @property
    def transformer_folder(self) -> Path:
        return self.folder / TRANSFORMER_SUBFOLDER if self.is_pipeline else self.folder


def resolve_path(model: str) -> Path:
    """Map ``zoo:NAME``, a folder, or a hub id to a local folder (hub ids fail offline with a hint)."""
    if model.startswith("zoo:"):
        name = model[4:]
        path = ZOO_DIR / name
        if not (path / "model_index.json").exists() and not (path / TRANSFORMER_SUBFOLDER).exists():
            known = ", ".join(sorted(p.name for p in ZOO_DIR.iterdir() if p.is_dir())) if ZOO_DIR.exists() else ""
            raise ModelNotFoundError(f"no zoo model {name!r}; shipped: {known or 'none'} "
                                     f"(train one with `compressdit zoo train {name}`)")
        return path
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelNotFoundError(f"{model} is a file; pass a diffusers model or pipeline folder")
        return path
    if model.count("/") == 1 and not model.startswith((".", "/", "~")):
        return _download(model)
    raise ModelNotFoundError(f"model path {model} does not exist")


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id))
    except Exception as exc:
        raise ModelNotFoundError(f"could not fetch hub model {repo_id!r} ({type(exc).__name__}); this machine may be "
                                 "offline: download it elsewhere and pass the local folder") from None


def _class_name(folder: Path) -> str:
    config = folder / "config.json"
    if not config.exists() and (folder / "model_index.json").exists():
        try:
            parts = sorted(k for k in json.loads((folder / "model_index.json").read_text()) if not k.startswith("_"))
        except (json.JSONDecodeError, AttributeError):
            parts = []
        raise CheckpointError(f"{folder} is a pipeline folder without transformer/config.json (its components: "
                              f"{', '.join(parts) or 'none'}): compressdit compresses a pipeline's diffusion "
                              "transformer")
    if not config.exists():
        raise CheckpointError(f"{folder} has no config.json: not a diffusers model folder")
    try:
        return json.loads(config.read_text())["_class_name"]
    except (json.JSONDecodeError, KeyError) as exc:
        raise CheckpointError(f"{config} is not a valid diffusers config ({exc})") from None


def transformer_class(folder: Path) -> type[nn.Module]:
    """The diffusers transformer class ``folder/config.json`` names; raise for anything else."""
    class_name = _class_name(folder)
    model_class = getattr(diffusers, class_name, None)
    if not is_diffusers_transformer(model_class):
        supported = sorted(a.model_class_name for _, a in ADAPTERS.items())
        raise UnsupportedModelError(f"unsupported model class {class_name} in {folder}: not a diffusers transformer; "
                                    f"supported: {', '.join(supported)}, and any diffusers transformer "
                                    "(diffusers.models.transformers) with nn.Linear layers")
    return model_class


def load_transformer(folder: Path, dtype: torch.dtype | None = None) -> nn.Module:
    """Load a diffusers transformer folder (quantized or not) after checking its files; the quantizer backend
    is registered by ``compressdit/__init__``, which Python runs before this module."""
    model_class = transformer_class(folder)
    verify_safetensors(folder)
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # missing/unexpected tensors become errors below, not warnings
    try:
        model, info = model_class.from_pretrained(folder, torch_dtype=dtype, output_loading_info=True)
    except CheckpointError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        shape = re.search(r"(\S+) expected shape torch\.Size\((\[.*?\])\), but got torch\.Size\((\[.*?\])\)", first)
        if shape:  # diffusers' text goes on to advise random re-initialisation, which is not what the user wants
            first = (f"tensor {shape.group(1)} has shape {shape.group(3)} in the weights but config.json implies "
                     f"{shape.group(2)}: config.json and weights do not match")
        raise CheckpointError(f"cannot load {folder}: {first}") from None
    finally:
        diffusers_logging.set_verbosity(verbosity)
    missing, unexpected = sorted(info["missing_keys"]), sorted(info["unexpected_keys"])
    if missing:
        raise CheckpointError(f"{folder}: config.json needs tensor {missing[0]} but the weights lack it "
                              f"({len(missing)} missing): config.json and weights do not match")
    if unexpected:
        raise CheckpointError(f"{folder}: the weights have tensor {unexpected[0]} that config.json does not use "
                              f"({len(unexpected)} unused): config.json and weights do not match")
    return model.eval()


def load_source(model: str, dtype: torch.dtype | None = None, name: str | None = None, text_encoder: str | None = None,
                embeddings: str | None = None, cache_dir: Path | None = None,
                transformer: nn.Module | None = None) -> ModelSource:
    """Load the transformer, and the VAE and scheduler where the folder is a pipeline; a text model gets its
    prompt encoder (``embeddings`` file, ``text_encoder`` pipeline, or the pipeline folder's own text encoders;
    loaded on first use, cached under ``cache_dir``). A ``transformer`` given (streaming: the model built on
    ``meta``) is used instead of loading one."""
    folder = resolve_path(model)
    is_pipeline = (folder / TRANSFORMER_SUBFOLDER / "config.json").exists()
    if transformer is None:
        transformer = load_transformer(folder / TRANSFORMER_SUBFOLDER if is_pipeline else folder, dtype)
    vae = scheduler = None
    if is_pipeline and (folder / "vae" / "config.json").exists():
        verify_safetensors(folder / "vae")
        vae_class = getattr(diffusers, _class_name(folder / "vae"), None)  # video VAEs: AutoencoderKLWan, ...
        if not (isinstance(vae_class, type) and issubclass(vae_class, diffusers.ModelMixin)):
            vae_class = diffusers.AutoencoderKL
        vae = vae_class.from_pretrained(folder / "vae", torch_dtype=torch.float32).eval()
    if is_pipeline and (folder / "scheduler" / "scheduler_config.json").exists():
        config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        scheduler_class = getattr(diffusers, config.get("_class_name", ""), diffusers.DPMSolverMultistepScheduler)
        scheduler = scheduler_class.from_pretrained(folder / "scheduler")
    info = {}
    card = folder / "training.json"
    if card.exists():
        info = json.loads(card.read_text())
    encoder_folder = None
    if text_encoder is not None:
        try:
            encoder_folder = resolve_path(text_encoder)
        except ModelNotFoundError as exc:
            raise ModelNotFoundError(f"--text-encoder: {exc}") from None
    encoder = prompt_encoder_for(adapter_for(transformer), folder, encoder_folder,
                                 None if embeddings is None else Path(embeddings).expanduser(), cache_dir)
    return ModelSource(name or model, folder, transformer, vae, scheduler, is_pipeline, info, encoder)

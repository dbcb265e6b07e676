"""Prompt encoders: prompts -> ``TextEmbedding``s through the text encoder a model was trained with.

One encoder travels with a loaded model (``ModelSource.prompt_encoder``) and is passed explicitly to whatever
samples it (``sample(..., prompt_encoder=...)``, :func:`encode_conditions`); null prompts (``""`` for
classifier-free guidance) go through it too. Kinds:

* ``pipeline``: a diffusers pipeline folder's own text encoders and tokenizers (T5, CLIP, ...), loaded without
  its transformer and VAE, called through that pipeline's ``encode_prompt``; the adapter maps the outputs to
  ``TextEmbedding``s (a model fact). Batched, on the compute device, cached on disk per prompt.
* ``embeddings``: a safetensors file of precomputed embeddings keyed by prompt (:func:`save_prompt_embeddings`).
* ``minilm``: MiniLM, the text encoder of compressdit's reference models. A model that brings no encoder gets
  ``None``: its prompts reach the adapter as strings, which embed them with MiniLM (``embed_prompts``).
"""

from __future__ import annotations

import hashlib
import json
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import torch

from compressdit.errors import ConfigError
from compressdit.io.checkpoint import stored_float_dtype
from compressdit.models.base import Conditioning, ModelAdapter
from compressdit.models.text_conditions import TextEmbedding, minilm_embeddings
from compressdit.registry import Registry

EMBEDDINGS_FORMAT = "compressdit-prompt-embeddings"


class PromptEncoder(ABC):
    """Turns the prompts among a list of conditions into ``TextEmbedding``s; ``key`` names it in cache keys."""

    kind: ClassVar[str]
    key: str

    @abstractmethod
    def embed(self, prompts: list[str]) -> list[TextEmbedding]:
        """Embeddings of distinct ``prompts``, in order, on the CPU."""

    def resolve(self, conditions: list[Any]) -> list[Any]:
        """``conditions`` with every prompt replaced by its embedding (one ``embed`` call over distinct prompts)."""
        unique = sorted({c for c in conditions if isinstance(c, str)})
        encoded = dict(zip(unique, self.embed(unique))) if unique else {}
        return [encoded[c] if isinstance(c, str) else c for c in conditions]


PROMPT_ENCODERS: Registry[type[PromptEncoder]] = Registry("prompt encoder")


def resolve_prompts(conditions: list[Any], encoder: PromptEncoder | None) -> list[Any]:
    """Prompts through ``encoder``; unchanged without one (the adapter then embeds them with MiniLM)."""
    return list(conditions) if encoder is None else encoder.resolve(conditions)


def encode_conditions(adapter: ModelAdapter, model, conditions: list[Any],
                      encoder: PromptEncoder | None = None) -> Conditioning:
    """``adapter.encode`` of ``conditions`` with their prompts embedded by ``encoder``."""
    return adapter.encode(model, resolve_prompts(conditions, encoder))


def encode_null(adapter: ModelAdapter, model, count: int, encoder: PromptEncoder | None = None) -> Conditioning:
    """The unconditional inputs for classifier-free guidance, through the same encoder as the prompts."""
    return encode_conditions(adapter, model, adapter.null_conditions(count), encoder)


@PROMPT_ENCODERS.register("minilm")
class MiniLMPromptEncoder(PromptEncoder):
    """all-MiniLM-L6-v2 token embeddings (384-d) with their masked mean as pooled vector (reference models)."""

    kind = "minilm"
    key = "minilm"

    def embed(self, prompts: list[str]) -> list[TextEmbedding]:
        return minilm_embeddings(prompts, pooled=True)


@PROMPT_ENCODERS.register("embeddings")
class EmbeddingsFilePromptEncoder(PromptEncoder):
    """Precomputed embeddings from a safetensors file written by :func:`save_prompt_embeddings`."""

    kind = "embeddings"

    def __init__(self, path: Path) -> None:
        from safetensors import SafetensorError, safe_open

        self.path = Path(path)
        if not self.path.is_file():
            raise ConfigError(f"--embeddings: {self.path} does not exist")
        try:
            with safe_open(str(self.path), framework="pt") as handle:
                meta = handle.metadata() or {}
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}
            prompts = json.loads(meta.get("prompts", "null"))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ConfigError(f"--embeddings: cannot read {self.path} ({str(exc).splitlines()[0]})") from None
        if meta.get("format") != EMBEDDINGS_FORMAT or not isinstance(prompts, list) or "tokens" not in tensors \
                or "mask" not in tensors or len(tensors["tokens"]) != len(prompts):
            raise ConfigError(f"--embeddings: {self.path} is not a prompt-embeddings file (tensors tokens [N, seq, "
                              "dim], mask [N, seq], optional pooled [N, dim] and a 'prompts' list in the metadata; "
                              "write one with compressdit.models.prompt_encoders.save_prompt_embeddings)")
        self.rows = {prompt: i for i, prompt in enumerate(prompts)}
        self.tensors = tensors
        self.key = "embeddings:" + hashlib.sha256(self.path.read_bytes()).hexdigest()[:16]

    def embed(self, prompts: list[str]) -> list[TextEmbedding]:
        missing = [p for p in prompts if p not in self.rows]
        if missing:
            raise ConfigError(f"prompt {missing[0]!r} is not in {self.path} ({len(missing)} of {len(prompts)} "
                              f"missing; it holds {len(self.rows)}): add their embeddings (classifier-free guidance "
                              "also needs the empty prompt \"\") or pass --text-encoder")
        pooled = self.tensors.get("pooled")
        return [TextEmbedding(self.tensors["tokens"][i], self.tensors["mask"][i],
                              None if pooled is None else pooled[i]) for i in (self.rows[p] for p in prompts)]


def save_prompt_embeddings(path: Path, prompts: list[str], embeddings: list[TextEmbedding]) -> Path:
    """Write an ``--embeddings`` file: one row per prompt (equal lengths; pooled vectors on all or none)."""
    from safetensors.torch import save_file

    if len(prompts) != len(embeddings) or len(set(prompts)) != len(prompts):
        raise ConfigError("save_prompt_embeddings: needs one embedding per distinct prompt")
    tensors = {"tokens": torch.stack([e.tokens for e in embeddings]).contiguous(),
               "mask": torch.stack([e.mask for e in embeddings]).contiguous()}
    if embeddings and embeddings[0].pooled is not None:
        tensors["pooled"] = torch.stack([e.pooled for e in embeddings]).contiguous()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": EMBEDDINGS_FORMAT, "prompts": json.dumps(list(prompts))})
    return Path(path)


def _save_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def prompt_hash(prompt: str) -> str:
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:32]


def compute_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


PIPELINE_PARTS = ("text_encoder", "tokenizer")  # model_index.json components a prompt encoder loads


def has_text_encoder(folder: Path) -> bool:
    """Whether ``folder`` is a diffusers pipeline whose model_index.json lists a text encoder it holds."""
    index = Path(folder) / "model_index.json"
    if not index.is_file():
        return False
    components = json.loads(index.read_text())
    return any(name.startswith("text_encoder") and isinstance(value, list) and value[0] is not None
               and (Path(folder) / name).is_dir() for name, value in components.items())


@PROMPT_ENCODERS.register("pipeline")
class PipelinePromptEncoder(PromptEncoder):
    """A pipeline folder's own text encoders through its ``encode_prompt``; ``adapter.prompt_embeddings`` maps
    the outputs. Loaded on first use (recipes that sample nothing never load them), run on ``device`` in
    batches of ``batch_size``; each prompt's embedding is cached under ``cache_dir`` by prompt hash."""

    kind = "pipeline"

    def __init__(self, folder: Path, adapter: ModelAdapter, cache_dir: Path | None = None,
                 device: torch.device | None = None, batch_size: int = 16) -> None:
        self.folder, self.adapter, self.batch_size = Path(folder), adapter, batch_size
        self.device = device or compute_device()
        self.memory: dict[str, TextEmbedding] = {}
        self.encoded = self.from_cache = 0
        self._pipeline = None
        files = sorted(p for p in self.folder.iterdir() if p.name.startswith(PIPELINE_PARTS) and p.is_dir())
        stats = [self.folder / "model_index.json"] + [f for d in files for f in sorted(d.rglob("*")) if f.is_file()]
        import diffusers
        import transformers

        # what the embeddings depend on: family, device kind, library versions (encode_prompt defaults), the files
        digest = hashlib.sha256(f"{adapter.family}|{self.device.type}|{diffusers.__version__}|"
                                f"{transformers.__version__}".encode())
        for f in stats:
            stat = f.stat()
            digest.update(f"{f.relative_to(self.folder)}|{stat.st_size}|{stat.st_mtime_ns}".encode())
        self.key = f"pipeline:{digest.hexdigest()[:16]}"
        self.cache = None if cache_dir is None else Path(cache_dir) / "prompt-embeddings" / self.key.split(":")[1]

    def pipeline(self):
        """The pipeline with its text encoders and tokenizers only, on ``device``, in their stored dtype."""
        if self._pipeline is None:
            from diffusers import DiffusionPipeline
            from diffusers.utils import logging as diffusers_logging
            from transformers.utils import logging as transformers_logging

            components = json.loads((self.folder / "model_index.json").read_text())
            kwargs: dict[str, Any] = {name: None for name, value in components.items()  # no transformer, VAE, ...
                                      if isinstance(value, list) and not name.startswith(PIPELINE_PARTS)}
            dtypes = [stored_float_dtype(self.folder / n) for n in components if n.startswith("text_encoder")
                      and (self.folder / n).is_dir()]
            dtype = next(filter(None, dtypes), None)
            if dtype is not None and dtype != torch.float32:  # keep half-precision encoders in half precision
                kwargs["torch_dtype"] = dtype
            levels = diffusers_logging.get_verbosity(), transformers_logging.get_verbosity()
            bars = diffusers_logging.is_progress_bar_enabled(), transformers_logging.is_progress_bar_enabled()
            for logging in (diffusers_logging, transformers_logging):
                logging.set_verbosity_error()
                logging.disable_progress_bar()
            try:
                pipe = DiffusionPipeline.from_pretrained(self.folder, **kwargs)
            except (OSError, ValueError, TypeError, KeyError) as exc:
                raise ConfigError(f"cannot load the text encoders of {self.folder}: "
                                  f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}"
                                  ) from None
            finally:
                for logging, level, bar in zip((diffusers_logging, transformers_logging), levels, bars):
                    logging.set_verbosity(level)
                    if bar:
                        logging.enable_progress_bar()
            pipe.set_progress_bar_config(disable=True)
            self._pipeline = pipe.to(self.device)
        return self._pipeline

    def _cached(self, prompt: str) -> TextEmbedding | None:
        if prompt in self.memory:
            return self.memory[prompt]
        path = None if self.cache is None else self.cache / f"{prompt_hash(prompt)}.safetensors"
        if path is None or not path.exists():
            return None
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        self.from_cache += 1
        self.memory[prompt] = TextEmbedding(tensors["tokens"], tensors["mask"], tensors.get("pooled"))
        return self.memory[prompt]

    @torch.no_grad()
    def embed(self, prompts: list[str]) -> list[TextEmbedding]:
        missing = [p for p in prompts if self._cached(p) is None]
        for start in range(0, len(missing), self.batch_size):
            batch = missing[start:start + self.batch_size]
            pipe = self.pipeline()
            try:
                embeddings = self.adapter.prompt_embeddings(pipe, batch, self.device)
            except (TypeError, AttributeError) as exc:
                raise ConfigError(f"{self.folder}: {type(pipe).__name__}.encode_prompt is not what the "
                                  f"{self.adapter.family} adapter expects ({str(exc).splitlines()[0]}); pass "
                                  "--embeddings FILE with precomputed embeddings") from None
            self.encoded += len(batch)
            for prompt, e in zip(batch, embeddings):
                e = TextEmbedding(e.tokens.cpu(), e.mask.cpu(), None if e.pooled is None else e.pooled.cpu())
                self.memory[prompt] = e
                if self.cache is not None:
                    tensors = {"tokens": e.tokens.contiguous(), "mask": e.mask.contiguous()}
                    if e.pooled is not None:
                        tensors["pooled"] = e.pooled.contiguous()
                    _save_atomic(tensors, self.cache / f"{prompt_hash(prompt)}.safetensors", {"prompt": prompt})
        return [self.memory[p] for p in prompts]


def prompt_encoder_for(adapter: ModelAdapter, folder: Path, text_encoder: Path | None = None,
                       embeddings: Path | None = None, cache_dir: Path | None = None) -> PromptEncoder | None:
    """The encoder for a model loaded from ``folder``: ``--embeddings``, else ``--text-encoder``'s pipeline,
    else the folder's own text encoders when it is a pipeline that has some; ``None`` when there are none."""
    if adapter.condition_kind != "text":
        if text_encoder is not None or embeddings is not None:
            flag = "--text-encoder" if text_encoder is not None else "--embeddings"
            raise ConfigError(f"{flag}: {adapter.model_class_name} is {adapter.condition_kind}-conditioned and "
                              "takes no prompts")
        return None
    if text_encoder is not None and embeddings is not None:
        raise ConfigError("pass --text-encoder or --embeddings, not both")
    if embeddings is not None:
        return PROMPT_ENCODERS.get("embeddings")(embeddings)
    if text_encoder is not None:
        if not has_text_encoder(text_encoder):
            raise ConfigError(f"--text-encoder: {text_encoder} is not a diffusers pipeline folder with text "
                              "encoders (model_index.json listing text_encoder*, and their subfolders)")
        return PROMPT_ENCODERS.get("pipeline")(text_encoder, adapter, cache_dir)
    if has_text_encoder(folder):
        return PROMPT_ENCODERS.get("pipeline")(folder, adapter, cache_dir)
    return None

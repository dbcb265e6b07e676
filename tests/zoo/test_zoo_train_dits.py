"""Tests for the reference-model trainers (compressdit.zoo.train_dits) on stand-in data (no real training)."""

from __future__ import annotations

import torch

from compressdit.io.checkpoint import stored_float_dtype
from compressdit.io.sources import load_source
from compressdit.models import adapter_for
from compressdit.models.sampling import sample
from compressdit.zoo import train_dits
from compressdit.zoo.registry import BASICS


def test_train_flux_writes_a_folder_that_loads_and_samples(tmp_path, monkeypatch):
    gen = torch.Generator().manual_seed(0)
    fake = (torch.randn(300, 4, 8, 8, generator=gen), torch.randint(0, 10, (300,), generator=gen))
    monkeypatch.setattr(train_dits, "encode_latents", lambda vae_dir, cache: fake)
    out = tmp_path / "flux-fmnist"
    info = train_dits.train_flux(BASICS / "vae", out, tmp_path / "runs" / "flux", steps=2, quiet=True)
    assert info["steps"] == 2 and (out / "training.json").exists()
    source = load_source(str(out))
    model = source.transformer
    assert type(model).__name__ == "FluxTransformer2DModel"
    assert model.config.num_layers == 4 and model.config.num_single_layers == 8
    assert stored_float_dtype(out / "transformer") == torch.float16  # shipped weights are 16-bit
    adapter = adapter_for(model)
    latents = sample(adapter, model.float(), ["a photo of a sneaker", "a photo of a bag"], source.scheduler,
                     steps=2, guidance=2.0, seed=0)
    assert latents.shape == (2, 4, 8, 8) and torch.isfinite(latents).all()


def test_interrupted_flux_training_resumes_from_its_state(tmp_path, monkeypatch):
    gen = torch.Generator().manual_seed(1)
    fake = (torch.randn(300, 4, 8, 8, generator=gen), torch.randint(0, 10, (300,), generator=gen))
    monkeypatch.setattr(train_dits, "encode_latents", lambda vae_dir, cache: fake)
    workdir = tmp_path / "runs" / "flux"
    assert train_dits.train_flux(BASICS / "vae", tmp_path / "out", workdir, steps=3, max_minutes=0.0,
                                 quiet=True) is None
    info = train_dits.train_flux(BASICS / "vae", tmp_path / "out", workdir, steps=3, quiet=True)
    assert info["steps"] == 3

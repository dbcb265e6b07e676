"""Measure a trained reference model and write its model card + sample grid."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch

from compressdit.evaluate.engine import CLASSIFIER_PATH, evaluation_conditions
from compressdit.evaluate.metrics import class_accuracy, frechet_distance
from compressdit.evaluate.report import image_grid, save_png
from compressdit.io.sources import load_source
from compressdit.models import adapter_for
from compressdit.models.sampling import decode_latents, sample
from compressdit.zoo.data import CLASS_NAMES, load_fmnist
from compressdit.zoo.train_basics import load_classifier


@torch.no_grad()
def measure_reference(folder: Path, samples: int = 500, guidances=(1.5, 3.0, 4.0), steps: int = 20) -> dict:
    """Class accuracy and FD-FMNIST of CFG samples at several guidance scales (DPM-Solver++, 20 steps)."""
    source = load_source(str(folder))
    adapter = adapter_for(source.transformer)
    classifier = load_classifier(CLASSIFIER_PATH)
    test_images, _ = load_fmnist("test")
    real = classifier.embed(test_images[:2000])
    conditions, labels = evaluation_conditions(adapter, samples)
    results, grid_images = {}, None
    for guidance in guidances:
        latents = sample(adapter, source.transformer, conditions, source.scheduler, steps=steps, guidance=guidance,
                         seed=0)
        images = decode_latents(source.vae, latents)
        results[f"cfg_{guidance:g}"] = {
            "class_accuracy": round(class_accuracy(classifier(images), labels), 4),
            "fd_fmnist_vs_test": round(frechet_distance(classifier.embed(images), real), 3),
        }
        if guidance == 4.0 or grid_images is None:
            grid_images = images
    recon = decode_latents(source.vae, source.vae.encode(test_images[:2000]).latent_dist.mean
                           * source.vae.config.scaling_factor)
    results["vae_reconstructions"] = {
        "class_accuracy": round(class_accuracy(classifier(recon), load_fmnist("test")[1][:2000]), 4),
        "fd_fmnist_vs_test": round(frechet_distance(classifier.embed(recon), real), 3),
    }
    order = torch.cat([torch.nonzero(labels == k).flatten()[:8] for k in range(10)])
    save_png(image_grid(grid_images[order], nrow=8), folder / "samples.png")
    return results


SAMPLERS = {"DPMSolverMultistepScheduler": "DPM-Solver++", "FlowMatchEulerDiscreteScheduler": "flow-matching Euler"}


def write_card(folder: Path, title: str, architecture: str, conditioning: str, metrics: dict, training: dict) -> Path:
    """``MODEL_CARD.md`` + ``metrics.json``; ``training`` is the trainer's ``training.json`` (``objective`` defaults
    to DDPM epsilon prediction)."""
    source = load_source(str(folder))
    params = sum(p.numel() for p in source.transformer.parameters())
    scheduler = type(source.scheduler).__name__
    sampler = SAMPLERS.get(scheduler, scheduler)
    lines = [f"# {title}", "", f"- architecture: {architecture} ({params:,} transformer parameters)",
             f"- conditioning: {conditioning}",
             "- data: Fashion-MNIST (Debian `dataset-fashion-mnist`, 60k train / 10k test), 28x28 zero-padded to "
             "32x32, [-1, 1]; latents from the shared `fmnist-vae` (4x8x8)",
             f"- training: {training.get('steps')} steps at batch {training.get('batch_size')}, AdamW, cosine "
             f"schedule, EMA 0.999, {training.get('objective', 'epsilon prediction, linear betas')}; "
             f"{training.get('train_seconds', 0) / 60:.1f} "
             f"min on CPU ({platform.processor() or platform.machine()}, 1 thread)",
             *([f"- weights: {training['weights']}"] if training.get("weights") else []),
             f"- sampling: {sampler} 20 steps, classifier-free guidance, seeds 0..N-1",
             "", "## Metrics (500 samples, balanced classes, classifier features)", "",
             "| setting | class accuracy | FD-FMNIST vs test |", "|---|---:|---:|"]
    for key, value in metrics.items():
        lines.append(f"| {key} | {value['class_accuracy']:.3f} | {value['fd_fmnist_vs_test']:.3f} |")
    lines += ["", "`vae_reconstructions`: the VAE's own reconstructions of 2000 test images, the ceiling for "
              "image metrics.", "", f"Classes: {', '.join(CLASS_NAMES)}.", "", "![samples](samples.png)", ""]
    path = folder / "MODEL_CARD.md"
    path.write_text("\n".join(lines))
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return path

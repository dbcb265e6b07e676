"""``distill``: train the compressed model towards the uncompressed reference on the ``data`` source's latents."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from compressdit.distill.data import DistillData
from compressdit.distill.losses import resolve_layer_map
from compressdit.distill.sources import DataContext, DataSpec, load_data
from compressdit.distill.trainer import DistillConfig, check_pair, distill
from compressdit.config_base import StrictConfig
from compressdit.errors import ConfigError, TrainingIncomplete
from compressdit.plots import plot_to_file
from compressdit.io.sources import ZOO_DIR, ModelSource, load_source
from compressdit.models.base import ModelAdapter
from compressdit.models.prompt_encoders import PromptEncoder
from compressdit.stages.base import STAGES, PipelineState, Stage


@dataclass
class DistillStageConfig(DistillConfig):
    """Every ``DistillConfig`` key plus the data and where the resumable state lives. YAML::

        - distill: {steps: 2000, batch_size: 64, lr: 1.0e-4, feature_weight: 0.01, data: auto}

    ``data``: where the training latents come from (:mod:`compressdit.distill.sources`): ``auto`` (default:
    Fashion-MNIST for the zoo's models, the teacher's own samples for any other), ``fmnist``, ``teacher`` or
    ``{source: images, path: ...}``. ``workdir``: training state (default: the cache folder, keyed by student,
    teacher and config), so a run stopped by ``max_minutes`` resumes when the same command is run again.
    """

    data: DataSpec = field(default_factory=DataSpec)
    workdir: str | None = None

    def trainer_keys(self) -> dict:
        """The keys that decide the training result (not where or how long it runs)."""
        return {k: v for k, v in self.to_dict().items() if k not in ("workdir", "max_minutes")}


def data_context(adapter: ModelAdapter, model: nn.Module, reference: ModelSource,
                 load_teacher: Callable[[], nn.Module], cache_dir: Path, quiet: bool = False,
                 sources: tuple[ModelSource, ...] = (), prompt_encoder: PromptEncoder | None = None) -> DataContext:
    """What the data sources need: ``reference`` is the uncompressed model's source (its folder keys the caches;
    ``load_teacher`` returns its transformer), ``sources`` other pipelines whose VAE / scheduler may serve;
    prompts go through ``prompt_encoder``, else the first of the sources' own (none for the zoo's models)."""
    candidates = (reference, *sources)
    vae = next((s.folder / "vae" for s in candidates if s.is_pipeline and (s.folder / "vae" / "config.json").exists()),
               None)
    scheduler = next((s.scheduler for s in candidates if s.scheduler is not None), None) or adapter.scheduler(model)
    is_zoo = Path(reference.folder).resolve().is_relative_to(ZOO_DIR.resolve())
    encoder = prompt_encoder or next((s.prompt_encoder for s in candidates if s.prompt_encoder is not None), None)
    return DataContext(adapter, model, reference.transformer_folder, load_teacher, vae, scheduler, cache_dir, is_zoo,
                       quiet, encoder)


def state_data(state: PipelineState, spec: DataSpec | None) -> DistillData:
    """Training latents for a stage of ``state`` (prune searches, Taylor scores): the teacher, where a source
    needs it, is the uncompressed model, reloaded from ``state.reference_spec`` (``state.model`` may be edited)."""
    context = data_context(state.adapter, state.model, state.source,
                           lambda: load_source(state.reference_spec).transformer, state.cache_folder(), state.quiet)
    return load_data(spec, context)


def fingerprint(*models: nn.Module) -> str:
    """SHA-1 of the models' tensors (names, dtypes, bytes)."""
    digest = hashlib.sha1()
    for model in models:
        for name, tensor in model.state_dict().items():
            digest.update(f"{name}:{tensor.dtype}:{list(tensor.shape)}".encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def routed_layouts(model: nn.Module) -> dict[str, dict]:
    """The layouts (``to_dict``) of the model's routed modules (MoE FFNs, routed blocks), by module name."""
    return {name: m.layout.to_dict() for name, m in model.named_modules()
            if isinstance(getattr(m, "layout", None), StrictConfig)}


def run_key(student: nn.Module, teacher: nn.Module, config: DistillStageConfig, origin=None) -> str:
    """The id of a distillation run (its default workdir): settings, both models' tensors, the block origin and
    the routed layouts (``top_k`` etc. are no tensors: without them dense2moe-50 and -62 would share a state)."""
    layouts = routed_layouts(student)
    key = json.dumps({"config": config.trainer_keys(), "models": fingerprint(student, teacher), "origin": origin,
                      **({"layouts": layouts} if layouts else {})}, sort_keys=True)
    return hashlib.sha1(key.encode()).hexdigest()[:16]


def run_distillation(student: nn.Module, teacher: ModelSource, config: DistillStageConfig, cache_dir: Path,
                     quiet: bool = False, origin=None, sources: tuple[ModelSource, ...] = (),
                     workdir: Path | None = None, prompt_encoder: PromptEncoder | None = None) -> dict:
    """Distil ``student`` (in place) from ``teacher`` on ``config.data``'s latents; the metrics of :func:`distill`
    plus ``data_note`` (where the latents came from). Prompts go through ``prompt_encoder`` (default: the
    teacher's own text encoder, when it has one).

    The training state lives in ``workdir`` (default: a cache folder named after student, teacher and config);
    a workdir that holds another run's state is an error, not silently resumed.
    """
    adapter = check_pair(student, teacher.transformer)
    if config.feature_weight:  # fail on unmappable blocks before encoding any data
        resolve_layer_map(adapter, student, teacher.transformer, config.layer_map, origin)
    run_id = run_key(student, teacher.transformer, config, origin)
    workdir = Path(workdir or config.workdir or cache_dir / "distill-runs" / run_id)
    marker = workdir / "run.json"
    if marker.exists() and json.loads(marker.read_text()).get("run") != run_id:
        raise ConfigError(f"workdir {workdir} holds the state of another distillation (other student, teacher or "
                          "settings); pass another workdir or delete it")
    workdir.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"run": run_id}))
    context = data_context(adapter, student, teacher, lambda: teacher.transformer, cache_dir, quiet, sources,
                           prompt_encoder)
    data = load_data(config.data, context)
    scheduler = next((s.scheduler for s in (teacher, *sources) if s.scheduler is not None), None)
    metrics = distill(student, teacher.transformer, adapter, config, workdir, data, origin=origin,
                      scheduler_config=dict(scheduler.config) if scheduler is not None else None, quiet=quiet)
    return {**metrics, "data_note": data.note}


def incomplete_message(metrics: dict) -> str:
    return (f"distillation stopped at step {metrics['steps']}/{metrics['target_steps']} (max_minutes); its state is "
            f"saved in {metrics['workdir']}: run the same command again to resume")


def loss_table(metrics: dict, config: DistillConfig) -> dict:
    weights = {"output": config.output_weight, "feature": config.feature_weight, "data": config.data_weight,
               "balance": config.balance_weight, "router_z": config.router_z_weight}
    first, last = metrics["history"][:10], metrics["history"][-10:]
    rows = [[name, weight, round(sum(h[name] for h in first) / len(first), 6),
             round(sum(h[name] for h in last) / len(last), 6)]
            for name, weight in weights.items() if first and name in first[0]]
    return {"title": "distillation losses (mean of the first / last 10 steps)",
            "header": ["loss", "weight", "first steps", "last steps"], "rows": rows}


def plot_losses(history: list[dict]) -> str:
    """A PNG (temp file) of each loss component over the steps, log scale."""
    def draw(ax) -> None:
        steps = range(1, len(history) + 1)
        for name in ("loss", "output", "feature", "data", "balance", "router_z"):
            if history and name in history[0]:
                ax.plot(steps, [max(h[name], 1e-12) for h in history], label=name, linewidth=1)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("MSE")
        ax.set_title("distillation losses (loss = weighted sum)")
        ax.legend()

    return plot_to_file(draw)


def expert_load_table(load: dict) -> dict:
    """The busiest expert's share of assignments per timestep bin (mean over MoE layers) during distillation."""
    width = 1000 // load["bins"]
    rows = [[f"{i * width}-{(i + 1) * width - 1}", round(share, 3), round(1 / load["experts"], 3)]
            for i, share in enumerate(load["busiest_share_per_bin"])]
    return {"title": f"expert load during distillation (router entropy {load['router_entropy']:.3f} nats)",
            "header": ["timesteps", "busiest expert's share", "balanced share"], "rows": rows}


class DistillStage(Stage):
    config_class = DistillStageConfig

    def run(self, state: PipelineState, config: DistillStageConfig) -> None:
        started = time.perf_counter()
        teacher = load_source(state.reference_spec, name=state.reference_spec)  # the source model was edited in place
        metrics = run_distillation(state.model, teacher, config, state.cache_folder(), state.quiet, state.block_origin,
                                   (state.source,), prompt_encoder=state.source.prompt_encoder)
        if not metrics["completed"]:
            raise TrainingIncomplete(incomplete_message(metrics))
        final, initial = metrics["final"], metrics["initial"]
        pairs = ", ".join(f"{s}<-{t}" for s, t in metrics["layer_map"]) or "none"
        state.notes.append(
            f"distill: {metrics['steps']} steps x batch {metrics['batch_size']} on {metrics['processes']} "
            f"process(es), {metrics['train_s']:.1f} s of training; loss {initial.get('loss', 0):.4g} -> "
            f"{final.get('loss', 0):.4g} (mean of the last 10 steps); feature layer map student<-teacher: {pairs}; "
            f"data: {metrics['data_note']}")
        state.tables.append(loss_table(metrics, config))
        if metrics["history"]:
            state.figures["Distillation loss"] = plot_losses(metrics["history"])
        if metrics.get("expert_load"):
            state.tables.append(expert_load_table(metrics["expert_load"]))
        state.timings["distill_s"] = round(time.perf_counter() - started, 2)


STAGES.add("distill", DistillStage())

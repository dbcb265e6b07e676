"""Where training latents come from: one ``data`` key, dispatched to a registered source.

``data: {source: NAME, ...NAME's keys}`` (or the bare name, or ``images:PATH`` on the command line). Sources:

- ``fmnist``: Fashion-MNIST encoded by the model's VAE (the zoo's training data);
- ``teacher``: data-free, the uncompressed model's own samples for the calibration conditions
  (:mod:`compressdit.distill.teacher_data`);
- ``images``: the user's image dataset, encoded by the pipeline's VAE (:mod:`compressdit.distill.image_data`);
- ``auto`` (the default): ``fmnist`` for the zoo's models, ``teacher`` for any other.

Every source has ``images``: how many training latents (the first N of a dataset, N samples of the teacher).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from compressdit.config_base import StrictConfig
from compressdit.distill import image_data, teacher_data  # noqa: F401  (register the images and teacher sources)
from compressdit.distill.data import fmnist_data
from compressdit.distill.source_registry import DATA_SOURCES, DataContext, DataSource
from compressdit.errors import ConfigError
from compressdit.models.prompt_encoders import resolve_prompts
from compressdit.zoo.registry import BASICS


def _check_images(where: str, images: int | None) -> None:
    if images is not None and images <= 0:
        raise ConfigError(f"{where}.images: must be positive or null, got {images}")


@dataclass
class FmnistDataConfig(StrictConfig):
    """Fashion-MNIST training images encoded by the model's VAE (1x32x32 in). YAML::

        data: {source: fmnist, images: 60000}

    ``images``: the first N training images (null: all 60,000); the latents are cached per VAE and count.
    """

    images: int | None = None

    def validate(self, where: str) -> None:
        _check_images(where, self.images)


@dataclass
class AutoDataConfig(StrictConfig):
    """``fmnist`` for the zoo's reference models, ``teacher`` for any other; ``images`` passes on. YAML::

        data: {source: auto, images: null}
    """

    images: int | None = None

    def validate(self, where: str) -> None:
        _check_images(where, self.images)


def _load_fmnist(config: FmnistDataConfig, context: DataContext):
    """The pipeline's VAE, else the zoo's Fashion-MNIST VAE."""
    vae = context.pipeline_vae or (BASICS / "vae" if (BASICS / "vae" / "config.json").exists() else None)
    if vae is None:
        raise ConfigError("data source fmnist needs a VAE to encode Fashion-MNIST: pass a pipeline folder (with vae/) "
                          "or train the zoo's with `compressdit zoo train fmnist-vae`")
    return fmnist_data(context.adapter, vae, context.cache_dir / "distill-data", config.images)


def _load_auto(config: AutoDataConfig, context: DataContext):
    name = "fmnist" if context.is_zoo else "teacher"
    source = DATA_SOURCES.get(name)
    options = {"images": config.images} if config.images is not None else {}
    return source.load(source.config_class.from_dict(options, f"data ({name})"), context)


DATA_SOURCES.add("auto", DataSource(AutoDataConfig, _load_auto))
DATA_SOURCES.add("fmnist", DataSource(FmnistDataConfig, _load_fmnist))


@dataclass
class DataSpec(StrictConfig):
    """``data: {source: NAME, ...}``: the source's keys are checked by its own config. YAML::

        data: {source: teacher, images: 2048, set: my-prompts.jsonl}

    Also accepts the bare name (``data: teacher``) and ``NAME:ARG`` for sources with an argument
    (``data: images:/data/shirts``, ``--data images:/data/shirts``)."""

    source: str = "auto"
    options: Any = field(default_factory=AutoDataConfig)

    @classmethod
    def from_dict(cls, data: Any, where: str | None = None) -> "DataSpec":
        where = where or "data"
        if data is None:
            data = {}
        if isinstance(data, str):
            name, _, arg = data.partition(":")
            if name in DATA_SOURCES and DATA_SOURCES.get(name).argument and arg:
                data = {"source": name, DATA_SOURCES.get(name).argument: arg}
            elif arg:
                raise ConfigError(f"{where}: {data!r}: a ':' argument fits only {_with_argument()}")
            else:
                data = {"source": name}
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a source name or a mapping with 'source', got {data!r}")
        data = dict(data)
        name = data.pop("source", "auto")
        if name not in DATA_SOURCES:
            raise ConfigError(f"{where}.source: unknown data source {name!r}; known: {', '.join(DATA_SOURCES)}")
        return cls(name, DATA_SOURCES.get(name).config_class.from_dict(data, where))

    def to_dict(self) -> dict:
        return {"source": self.source, **self.options.to_dict()}

    def with_images(self, images: int) -> "DataSpec":
        """The same source with ``images`` set (``compressdit distill --images``)."""
        return DataSpec.from_dict({**self.to_dict(), "images": images}, "--images")


def _with_argument() -> str:
    return ", ".join(f"{name}:{source.argument.upper()}" for name, source in DATA_SOURCES.items() if source.argument)


def load_data(spec: DataSpec | None, context: DataContext):
    """The :class:`~compressdit.distill.data.DistillData` of ``spec`` (default: ``auto``), its prompts (condition
    vocabulary and null condition) embedded once by the context's prompt encoder, when it has one."""
    spec = spec or DataSpec()
    data = DATA_SOURCES.get(spec.source).load(spec.options, context)
    if context.prompt_encoder is not None:
        resolved = resolve_prompts([*data.conditions, data.null_condition], context.prompt_encoder)
        data.conditions, data.null_condition = resolved[:-1], resolved[-1]
    return data


def set_data(configs: list, data: str | dict) -> int:
    """Set ``data`` on every config (or method options of one) that has the key; how many were set."""
    spec = DataSpec.from_dict(data, "--data")
    count = 0
    for config in configs:
        for target in (config, getattr(config, "options", None)):
            if target is not None and hasattr(target, "data"):
                target.data = spec
                count += 1
    return count


# the sources in their own modules register themselves (they import this module's registry)
@dataclass
class CalibrationDraws(StrictConfig):
    """Noised latents a structural stage reads (importance, expert split, router fits): ``batches`` batches of
    ``batch_size`` drawn from ``data`` as the distillation trainer draws them, conditions dropped with
    ``condition_dropout``, every draw from a generator seeded with ``seed``. Stage configs inherit these keys (and
    may change the two defaults) and call :meth:`validate_draws` from their ``validate``."""

    batches: int = 4
    batch_size: int = 64
    data: DataSpec = field(default_factory=DataSpec)
    seed: int = 0
    condition_dropout: float = 0.1

    def validate_draws(self, where: str) -> None:
        self.require_positive(where, "batches", "batch_size")
        if not 0.0 <= self.condition_dropout < 1.0:
            raise ConfigError(f"{where}.condition_dropout: must be in [0, 1), got {self.condition_dropout}")


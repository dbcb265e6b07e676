"""Recipes: versioned YAML lists of stages, each parsed into its registered typed config."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from compressdit.errors import ConfigError
from compressdit.io.diffusers_quantizer import CompressditConfig
from compressdit.quant.methods import METHODS
from compressdit.stages import STAGES

RECIPE_VERSION = 1
RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"


@dataclass
class StageSpec:
    """One parsed stage: its registered name and typed config."""

    name: str
    config: Any

    def to_dict(self) -> dict:
        return {self.name: self.config.to_dict()}


@dataclass
class Recipe:
    """A named, versioned list of stages. YAML::

        version: 1
        name: rtn-w8a8
        description: round-to-nearest W8A8 baseline
        stages:
          - quantize: {method: rtn, rules: [{match: "role:embedder", spec: null}, {match: "re:.*", spec: {w_bits: 8, a_bits: 8}}]}
          - evaluate: {samples: 256}
    """

    name: str
    stages: list[StageSpec]
    description: str = ""
    version: int = RECIPE_VERSION
    source: str = field(default="", compare=False)

    @classmethod
    def from_dict(cls, data: Any, source: str = "<recipe>") -> "Recipe":
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: a recipe must be a mapping with 'version', 'name' and 'stages'")
        allowed = {"version", "name", "description", "stages"}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise ConfigError(f"{source}: unknown recipe key {unknown[0]!r}; allowed: {', '.join(sorted(allowed))}")
        version = data.get("version")
        if version != RECIPE_VERSION:
            raise ConfigError(f"{source}: recipe version must be {RECIPE_VERSION}, got {version!r}")
        stages_data = data.get("stages")
        if not isinstance(stages_data, list) or not stages_data:
            raise ConfigError(f"{source}: 'stages' must be a non-empty list")
        stages = []
        for i, entry in enumerate(stages_data):
            if not isinstance(entry, dict) or len(entry) != 1:
                raise ConfigError(f"{source}: stages[{i}] must be a single-key mapping like '- quantize: {{...}}'")
            (stage_name, stage_data), = entry.items()
            handler = STAGES.get(stage_name) if stage_name in STAGES else None
            if handler is None:
                raise ConfigError(f"{source}: stages[{i}]: unknown stage {stage_name!r}; "
                                  f"known: {', '.join(STAGES)}")
            stages.append(StageSpec(stage_name, handler.parse(stage_data, f"{source}: stages[{i}].{stage_name}")))
        name = data.get("name")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{source}: 'name' must be a non-empty string")
        return cls(name=name, stages=stages, description=str(data.get("description", "")), version=version,
                   source=source)

    def to_dict(self) -> dict:
        return {"version": self.version, "name": self.name, "description": self.description,
                "stages": [s.to_dict() for s in self.stages]}

    def dump(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def stage(self, name: str) -> StageSpec | None:
        return next((s for s in self.stages if s.name == name), None)


def load_recipe(name_or_path: str) -> Recipe:
    """Load ``recipes/NAME.yaml`` or a YAML file path."""
    path = Path(name_or_path)
    if not (path.suffix in (".yaml", ".yml") or path.exists()):
        path = RECIPES_DIR / f"{name_or_path}.yaml"
        if not path.exists():
            raise ConfigError(f"unknown recipe {name_or_path!r}; shipped: {', '.join(list_recipes())}")
    if path.is_dir():
        raise ConfigError(f"recipe {path} is a folder; pass a recipe YAML file or a shipped recipe name")
    if not path.is_file():
        raise ConfigError(f"recipe file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML ({str(exc).splitlines()[0]})") from None
    return Recipe.from_dict(data, source=str(path.name))


def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def recipe_config(recipe: str | Recipe, modules_to_not_convert: list[str] | None = None) -> CompressditConfig:
    """The diffusers ``quantization_config`` that quantizes a float checkpoint as it loads, as the data-free
    ``recipe`` (a shipped name or a YAML path) does: its quantize stage's rules, every layer rounded from its own
    weights (the evaluate stage is the CLI's report); modules with a ``modules_to_not_convert`` entry in their name
    stay float too. Recipes that calibrate, prune or distill need ``compressdit quantize``. ::

        transformer = PixArtTransformer2DModel.from_pretrained(path, subfolder="transformer",
                                                               quantization_config=compressdit.recipe_config("rtn-w8a8"))
    """
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    rules, reason = _data_free_rules(recipe)
    if rules is None:
        raise ConfigError(f"recipe {recipe.name}: {reason}; run it with the CLI (`compressdit quantize|prune|moe MODEL "
                          f"--recipe {recipe.name} --out OUT`) and load OUT (recipes that load on the fly: "
                          f"{', '.join(data_free_recipes())})")
    return CompressditConfig(rules=[rule.to_dict() for rule in rules], modules_to_not_convert=modules_to_not_convert)


def data_free_recipes() -> list[str]:
    """The shipped recipes :func:`recipe_config` turns into a ``quantization_config``."""
    return [name for name in list_recipes() if _data_free_rules(load_recipe(name))[0] is not None]


def _data_free_rules(recipe: Recipe) -> tuple[list | None, str]:
    """(the rules of ``recipe``'s one quantize stage, "") where it needs no data, else (None, why not)."""
    rules = None
    for stage in recipe.stages:
        if stage.name == "evaluate":
            continue
        if stage.name != "quantize":
            return None, f"its {stage.name} stage cannot run while a checkpoint loads (loading rounds weights only)"
        handler, options = METHODS.get(stage.config.method), stage.config.options
        if handler.needs_calibration(options):
            return None, f"method {stage.config.method!r} as configured needs calibration data"
        found = handler.plan_rules(options) if handler.plan_rules is not None else None
        if found is None:
            return None, f"method {stage.config.method!r} as configured decides over layers jointly"
        if rules is not None:
            return None, "more than one quantize stage (merge their rules into one to load it on the fly)"
        rules = found
    return rules, "" if rules is not None else "no quantize stage"

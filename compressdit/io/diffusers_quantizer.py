"""The ``compressdit`` backend of diffusers' quantizer machinery, registered by ``import compressdit``.

Stock ``Model.from_pretrained(folder)`` reads ``quantization_config`` from ``config.json``, builds empty
quantized modules from its per-module entries, then loads packed weights and fp32 scales into them.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import weakref
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_module_tensor_to_device
from diffusers.configuration_utils import FrozenDict
from diffusers.quantizers.base import DiffusersQuantizer
from diffusers.quantizers.quantization_config import QuantizationConfigMixin

from compressdit.errors import CheckpointError, ConfigError, UnsupportedModelError
from compressdit.io.checkpoint import files_float_dtype
from compressdit.io.diffusers_lora import register_lora_support
from compressdit.io.structure import HEADS, IDENTITY, MOB, MOE, TAIL_SUM, WIDTH, apply_structure
from compressdit.quant.kernel_registry import prepack_model
from compressdit.quant.layers import PackedParameter, QuantizedLinear
from compressdit.quant.spec import LinearQuantSpec
from compressdit.models import adapter_for
from compressdit.quant.methods import rules_need_calibration
from compressdit.quant.transform import (LayerRule, build_empty_layers, check_plan_fits, dequantize_layers,
                                         quantize_layers, resolve_plan)

FORMAT_VERSION = 1
FLOAT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

STRUCTURE_KEYS = (WIDTH, HEADS, MOE, MOB, TAIL_SUM, IDENTITY)  # what a model's non-stock shapes are rebuilt from


class CompressditMethod(str, Enum):
    """diffusers reads ``quant_method.value``; its own enum cannot be extended."""

    COMPRESSDIT = "compressdit"


class CompressditConfig(QuantizationConfigMixin):
    """``quantization_config`` of a compressdit checkpoint: format version + one spec per module.

    ``modules`` maps fully qualified linear names to :class:`LinearQuantSpec` dicts. Passing this
    config to ``from_pretrained`` of a float model quantizes those modules with round-to-nearest; so does
    ``rules`` (ordered ``{match, spec}`` rules as in a recipe's quantize stage, first match wins, ``spec: null``
    keeps a layer float), resolved against the model being loaded (its adapter's roles) into ``modules``::

        CompressditConfig(rules=[{"match": "role:embedder", "spec": None}, {"match": "role:head", "spec": None},
                                 {"match": "re:.*", "spec": {"w_bits": 8, "a_bits": 8}}])

    (``compressdit.recipe_config("rtn-w8a8")`` builds it from a shipped data-free recipe). Rules that need
    calibration (balancing, static scales, GPTQ / AdaRound rounding) are refused: ``compressdit quantize`` runs them.
    ``pre_quantization_dtype`` is the dtype the checkpoint's float (unquantized) tensors are stored in
    (absent in older checkpoints: as found). ``save_pretrained`` writes them in it again, so a model loaded
    without ``torch_dtype`` (float32 in memory) and saved keeps every tensor's dtype; loading with
    ``torch_dtype`` records that dtype instead.
    """

    def __init__(self, modules: dict[str, dict] | None = None, format_version: int = FORMAT_VERSION,
                 producer: str = "compressdit", structure: dict | None = None,
                 quant_method: str = CompressditMethod.COMPRESSDIT.value, pre_quantization_dtype: str | None = None,
                 rules: list[dict] | None = None, modules_to_not_convert: list[str] | None = None,
                 **unknown: Any) -> None:
        if unknown:
            raise ConfigError(f"quantization_config: unknown key {sorted(unknown)[0]!r}; allowed: "
                              "format_version, modules, modules_to_not_convert, pre_quantization_dtype, producer, "
                              "quant_method, rules, structure")
        if pre_quantization_dtype is not None and pre_quantization_dtype not in FLOAT_DTYPES:
            raise ConfigError(f"quantization_config.pre_quantization_dtype: {pre_quantization_dtype!r} is not one "
                              f"of {', '.join(FLOAT_DTYPES)}")
        self.pre_quantization_dtype = pre_quantization_dtype
        if quant_method != CompressditMethod.COMPRESSDIT.value:
            raise ConfigError(f"quantization_config: quant_method must be 'compressdit', got {quant_method!r}")
        if not isinstance(format_version, int) or format_version > FORMAT_VERSION:
            raise ConfigError(f"checkpoint format_version {format_version!r} is newer than this compressdit "
                              f"supports ({FORMAT_VERSION}); upgrade compressdit")
        self.quant_method = CompressditMethod.COMPRESSDIT
        self.format_version = format_version
        self.producer = producer
        self.structure = dict(structure or {})
        self.modules = {name: LinearQuantSpec.from_dict(spec, f"quantization_config.modules[{name!r}]").to_dict()
                        for name, spec in (modules or {}).items()}
        self.rules = _on_the_fly_rules(rules)
        if self.rules and self.modules:
            raise ConfigError("quantization_config: give modules (what a checkpoint records) or rules (to quantize a "
                              "float checkpoint as it loads), not both")
        if modules_to_not_convert is not None and (
                not self.rules or not isinstance(modules_to_not_convert, (list, tuple))
                or not all(isinstance(name, str) and name for name in modules_to_not_convert)):
            raise ConfigError("quantization_config.modules_to_not_convert: a list of module names (or parts of them) "
                              "that rules leave float; it goes with rules")
        self.modules_to_not_convert = list(modules_to_not_convert or [])

    def specs(self) -> dict[str, LinearQuantSpec]:
        return {name: LinearQuantSpec(**spec) for name, spec in self.modules.items()}

    def to_dict(self) -> dict[str, Any]:
        data = {"quant_method": self.quant_method.value, "format_version": self.format_version,
                "producer": self.producer, "modules": json.loads(json.dumps(self.modules)),
                "structure": json.loads(json.dumps(self.structure))}
        if self.pre_quantization_dtype is not None:
            data["pre_quantization_dtype"] = self.pre_quantization_dtype
        if self.rules:
            data["rules"] = [rule.to_dict() for rule in self.rules]
        if self.modules_to_not_convert:
            data["modules_to_not_convert"] = list(self.modules_to_not_convert)
        return data

    def resolved_for(self, model, keep_in_fp32_modules=None) -> CompressditConfig:
        """The per-module config ``rules`` give for ``model``, a new config (one rules config can load several
        models); modules diffusers keeps in fp32 stay float, as do those with a ``modules_to_not_convert`` entry
        in their name (a substring, as diffusers' other backends match). ``self`` where it names its modules."""
        if not self.rules:
            return self
        try:
            adapter = adapter_for(model)
        except UnsupportedModelError as exc:  # a pipeline's VAE under a pipeline-wide quant_backend: name the fix
            raise UnsupportedModelError(f"{exc}; in a pipeline, quantize its transformer only: "
                                        "PipelineQuantizationConfig(..., components_to_quantize=['transformer'])"
                                        ) from None
        plan = {name: spec for name, spec in resolve_plan(model, adapter, self.rules).items()
                if spec is not None and not kept_in_fp32(name, keep_in_fp32_modules)
                and not any(part in name for part in self.modules_to_not_convert)}
        if not plan:
            raise ConfigError(f"quantization_config.rules match no linear layer of {type(model).__name__}")
        return CompressditConfig(modules={name: spec.to_dict() for name, spec in plan.items()},
                                 producer=self.producer, pre_quantization_dtype=self.pre_quantization_dtype)

    def record_float_dtype(self, dtype: torch.dtype | None) -> None:
        """Note the dtype the unquantized tensors are (about to be) saved in (``None``: float32)."""
        names = {v: k for k, v in FLOAT_DTYPES.items()}
        dtype = dtype or torch.float32
        if dtype not in names:
            raise ConfigError(f"cannot save float tensors in {dtype}; use one of {', '.join(FLOAT_DTYPES)}")
        self.pre_quantization_dtype = names[dtype]

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()

    def to_json_string(self, use_diff: bool = True) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def config_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def kept_in_fp32(name: str, keep_in_fp32_modules) -> bool:
    """Whether ``name`` (a module or tensor) lies in one of a model's ``_keep_in_fp32_modules``: one of its dotted
    parts is one, as diffusers' loader matches them."""
    return bool(keep_in_fp32_modules) and not set(keep_in_fp32_modules).isdisjoint(name.split("."))


def _on_the_fly_rules(rules: list[dict] | None) -> list[LayerRule]:
    if rules is None:
        return []
    if not isinstance(rules, (list, tuple)) or not rules:
        raise ConfigError("quantization_config.rules: a non-empty list of {match, spec} rules")
    parsed = [LayerRule.from_dict(rule, f"quantization_config.rules[{i}]") for i, rule in enumerate(rules)]
    for i, rule in enumerate(parsed):
        if rules_need_calibration([rule]):
            raise ConfigError(f"quantization_config.rules[{i}] ({rule.spec.label}) needs calibration (channel "
                              "balancing, static activation scales, GPTQ / AdaRound rounding), which loading cannot "
                              "run: quantize with `compressdit quantize MODEL --recipe ...` and load its output")
    return parsed


class CompressditQuantizer(DiffusersQuantizer):
    """Builds empty quantized modules before loading and fills them with checked tensors."""

    use_keep_in_fp32_modules = True
    requires_calibration = False

    def __init__(self, quantization_config: CompressditConfig, **kwargs) -> None:
        super().__init__(quantization_config, **kwargs)
        if not self.pre_quantized:  # the user's config may load other models (in other dtypes): this load's own
            self.quantization_config = copy.deepcopy(quantization_config)

    # -- loading -----------------------------------------------------------------
    def _process_model_before_weight_loading(self, model, keep_in_fp32_modules=None, **kwargs):
        if not self.pre_quantized:  # on the fly: the rules' modules of this model, recorded in its config
            self.quantization_config = self.quantization_config.resolved_for(model, keep_in_fp32_modules)
            check_plan_fits(model, self.quantization_config.specs())
            model.register_to_config(quantization_config=self.quantization_config)
            return model
        apply_structure(model, self.quantization_config.structure)  # pruned widths first, quantized modules on them
        specs = self.quantization_config.specs()
        kept = [n for n in specs if kept_in_fp32(n, keep_in_fp32_modules)]
        if kept:
            raise CheckpointError(f"{type(model).__name__} keeps {kept[0]!r} in fp32 but the checkpoint quantizes it")
        build_empty_layers(model, specs)
        self._check_unused_tensors(model)
        return model

    def maybe_update_loaded_keys(self, loaded_keys, checkpoint_files):
        self._loaded_keys = list(loaded_keys)  # diffusers only warns about unexpected keys; we check them
        self._checkpoint_files = [str(f) for f in checkpoint_files or [] if isinstance(f, (str, Path))]
        if not self.pre_quantized and self.quantization_config.pre_quantization_dtype is None:
            # on the fly without torch_dtype: saved again in the source's float dtype, as the CLI writes it
            stored = files_float_dtype(f for f in self._checkpoint_files if f.endswith(".safetensors"))
            if stored is not None:
                self.quantization_config.record_float_dtype(stored)
        return loaded_keys

    def _check_unused_tensors(self, model) -> None:
        """A quantized layer's tensor the config does not use (e.g. a zero point) would be dropped silently."""
        modules = {name: set(m.state_dict()) for name, m in model.named_modules()
                   if isinstance(m, QuantizedLinear)}
        for key in getattr(self, "_loaded_keys", None) or []:
            module_name, _, tensor_name = key.rpartition(".")
            if module_name in modules and tensor_name not in modules[module_name]:
                raise CheckpointError(f"checkpoint has {key}, which the quantization_config's spec for "
                                      f"{module_name} does not use (mismatched config and weights)")

    def _process_model_after_weight_loading(self, model, **kwargs):
        self.note_saved_as_is(model)
        if not self.pre_quantized:  # each planned linear was quantized as its tensors loaded
            unloaded = [n for n in self.quantization_config.modules
                        if not isinstance(model.get_submodule(n), QuantizedLinear)]
            if unloaded:
                raise CheckpointError(f"{unloaded[0]} was not quantized while loading (its tensors were offloaded to "
                                      "disk or are missing); quantizing on load needs them in memory: drop \"disk\" "
                                      "from the device_map, or quantize with `compressdit quantize` and load its output")
            prepack_model(model)
            return model
        self._restore_offloaded(model)
        loaded = set(getattr(self, "_loaded_keys", None) or [])
        for name, module in model.named_modules():
            if isinstance(module, QuantizedLinear):
                for tensor_name in module.quantized_tensors:
                    tensor = getattr(module, tensor_name, None)
                    # offloaded to disk by a device_map, a loaded tensor stays on ``meta`` until its forward
                    missing = f"{name}.{tensor_name}" not in loaded if loaded else tensor is not None and tensor.is_meta
                    if tensor is not None and missing:
                        raise CheckpointError(f"checkpoint is missing {name}.{tensor_name} "
                                              "(truncated or mismatched checkpoint)")

        prepack_model(model)  # runtime buffers of each layer's kernel: built at load, never saved
        return model

    def _restore_offloaded(self, model) -> None:
        """After a load that offloaded to disk, put the quantized tensors back exactly as stored.

        With ``"disk"`` in the ``device_map`` diffusers writes tensors to offload folders after casting floats to
        ``torch_dtype`` and without asking the quantizer (the CPU-mapped ones too, reloaded from a temporary
        folder): fp32 scales would come back rounded to bf16. The offloaded copies are rewritten, the loaded
        ones overwritten, from the checkpoint.
        """
        from accelerate.utils import offload_weight, save_offload_index
        from safetensors import safe_open

        tensors: dict[str, tuple[torch.Tensor, Any]] = {}  # key -> (module's tensor, offload loader or None)
        for name, module in model.named_modules():
            if not isinstance(module, QuantizedLinear):
                continue
            weights = getattr(getattr(module, "_hf_hook", None), "weights_map", None)
            loader = getattr(weights, "dataset", weights)
            for key, tensor in ((f"{name}.{t}", getattr(module, t)) for t in module.quantized_tensors):
                if tensor is None:
                    continue
                offloaded = getattr(loader, "save_folder", None) is not None and key in loader.index
                tensors[key] = (tensor, loader if offloaded else None)
        loaders = {id(lo): lo for _, lo in tensors.values() if lo is not None}
        for path in getattr(self, "_checkpoint_files", []) if loaders else []:
            with safe_open(path, framework="pt") as handle:
                for key in set(handle.keys()) & set(tensors):
                    (tensor, loader), value = tensors[key], handle.get_tensor(key)
                    if value.dtype != tensor.dtype:
                        raise CheckpointError(f"{key}: checkpoint dtype {value.dtype} does not match the "
                                              f"quantization_config ({tensor.dtype})")
                    if loader is not None:
                        offload_weight(value, key, loader.save_folder, loader.index)
                    elif not tensor.is_meta:
                        tensor.data.copy_(value)
        for loader in loaders.values():
            save_offload_index(loader.index, loader.save_folder)

    def check_if_quantized_param(self, model, param_value, param_name, state_dict, **kwargs) -> bool:
        module_name, _, tensor_name = param_name.rpartition(".")
        if not self.pre_quantized:  # on the fly: a planned linear's float tensors (create_quantized_param)
            return module_name in self.quantization_config.modules and tensor_name in ("weight", "bias")
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            return False
        if isinstance(module, QuantizedLinear):
            return tensor_name in module.quantized_tensors
        # A width-pruned float tensor is claimed only when its shape contradicts the manifest, so that
        # check_quantized_param_shape names it (diffusers' own error suggests re-initialising the weights).
        placeholder = getattr(module, tensor_name, None)
        return (module_name in self.quantization_config.structure.get("width", {})
                and isinstance(placeholder, torch.Tensor) and placeholder.shape != param_value.shape)

    def check_quantized_param_shape(self, param_name, current_param, loaded_param):
        if tuple(current_param.shape) != tuple(loaded_param.shape):
            module_name = param_name.rpartition(".")[0]
            pruned = module_name in self.quantization_config.structure.get("width", {})
            source = f"the width recorded in quantization_config.structure for {module_name}" if pruned else \
                "the quantization_config"
            raise CheckpointError(f"{param_name}: checkpoint shape {tuple(loaded_param.shape)} does not match "
                                  f"{source} ({tuple(current_param.shape)})")
        return True

    def create_quantized_param(self, model, param_value, param_name, target_device, state_dict=None,
                               unexpected_keys=None, **kwargs):
        if not self.pre_quantized:
            self._quantize_once_loaded(model, param_name, param_value, target_device)
            return
        module_name, _, tensor_name = param_name.rpartition(".")
        module = model.get_submodule(module_name)
        placeholder = getattr(module, tensor_name)
        if state_dict is not None and param_name in state_dict:
            param_value = state_dict[param_name]  # the loader already cast floats to torch_dtype
        self.check_quantized_param_shape(param_name, placeholder, param_value)
        if param_value.dtype != placeholder.dtype:
            raise CheckpointError(f"{param_name}: checkpoint dtype {param_value.dtype} does not match the "
                                  f"quantization_config ({placeholder.dtype})")
        value = param_value.to(target_device if target_device not in (None, "disk") else "cpu")
        if isinstance(placeholder, PackedParameter):
            module._parameters[tensor_name] = PackedParameter(value, logical_numel=placeholder.logical_numel,
                                                           logical_shape=placeholder.logical_shape)
        else:  # scales etc. (QuantState) and a calibrated fp32 bias: the placeholder's class, frozen
            module._parameters[tensor_name] = type(placeholder)(value, requires_grad=False)

    def _quantize_once_loaded(self, model, param_name: str, value: torch.Tensor, device) -> None:
        """On the fly: put a planned linear's float tensor (already in ``torch_dtype``) in place and quantize the
        linear as soon as none of its tensors is left on ``meta``, so that the float model is never whole in memory
        (one layer at a time, whatever order its weight and bias come in, across shards too)."""
        set_module_tensor_to_device(model, param_name, device, value=value, dtype=value.dtype)  # as diffusers casts
        module_name = param_name.rpartition(".")[0]
        if not any(t.is_meta for t in model.get_submodule(module_name).parameters(recurse=False)):
            quantize_layers(model, {module_name: LinearQuantSpec(**self.quantization_config.modules[module_name])})

    def update_torch_dtype(self, torch_dtype: torch.dtype | None) -> torch.dtype:
        """float32 unless asked (as for a float model); diffusers records it as ``_pre_quantization_dtype``.

        A given ``torch_dtype`` is what the float tensors are loaded, and later saved, in: the config says so.
        """
        if torch_dtype is None:
            return torch.float32
        if torch_dtype in FLOAT_DTYPES.values():
            self.quantization_config.record_float_dtype(torch_dtype)
        return torch_dtype

    def note_saved_as_is(self, model) -> None:
        """Remember the model, whose quantized layers' and keep-in-fp32 modules' tensors saving never casts."""
        self._model = weakref.ref(model)

    def __getstate__(self) -> dict:
        """Pickled (``torch.save(model)``, ``copy.deepcopy``) with the model itself in place of the weak reference
        (which pickle refuses): the copy's quantizer then refers to the copied model, not to the original."""
        state = dict(self.__dict__)
        model = state.pop("_model", None)
        state["_model_object"] = None if model is None else model()
        return state

    def __setstate__(self, state: dict) -> None:
        model = state.pop("_model_object", None)
        self.__dict__.update(state)
        if model is not None:
            self._model = weakref.ref(model)

    def _saved_as_is(self) -> set[str] | None:
        model = self._model() if getattr(self, "_model", None) is not None else None
        if model is None:
            return None
        keep = getattr(model, "_keep_in_fp32_modules", None) or []
        names = {f"{n}.{t}" for n, m in model.named_modules() if isinstance(m, QuantizedLinear)
                 for t in m.quantized_tensors}
        return names | {k for k in model.state_dict() if kept_in_fp32(k, keep)}

    def get_state_dict_and_metadata(self, state_dict, safe_serialization=False):
        dtype = FLOAT_DTYPES.get(self.quantization_config.pre_quantization_dtype)
        kept = self._saved_as_is()
        if dtype is not None and kept is not None:  # float tensors back in their stored dtype (CompressditConfig)
            state_dict = {k: v.to(dtype) if v.is_floating_point() and k not in kept else v
                          for k, v in state_dict.items()}
        return state_dict, {"compressdit_format_version": str(FORMAT_VERSION),
                            "compressdit_config_hash": self.quantization_config.config_hash()}

    # -- after loading -----------------------------------------------------------
    def _dequantize(self, model):

        dequantize_layers(model)
        config = dict(model._internal_dict)
        config.pop("quantization_config", None)
        structure = self.quantization_config.structure
        if any(structure.get(k) for k in STRUCTURE_KEYS):  # pruned / MoE / MoB layers need the manifest
            config["quantization_config"] = CompressditConfig(structure=structure)
        model._internal_dict = FrozenDict(config)
        return model

    @property
    def is_serializable(self) -> bool:
        return True

    @property
    def is_compileable(self) -> bool:
        """Every kernel is a ``torch.library`` custom op with a fake impl (see ``quant/kernel_registry``)."""
        return True

    @property
    def is_trainable(self) -> bool:
        return True


class TransformersComponentConfig:
    """What transformers' backends hold under ``compressdit``: ``PipelineQuantizationConfig(quant_backend=
    "compressdit", quant_kwargs=...)`` accepts a backend only where diffusers and transformers both name it, with
    the same ``__init__`` parameters, and builds the transformers one for a pipeline's transformers components (its
    text encoders), which compressdit does not quantize: building it raises one clear line naming the fix."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise ConfigError("compressdit quantizes a pipeline's diffusion transformer, not its transformers components "
                          "(text encoders): pass components_to_quantize=['transformer'] (or quant_mapping="
                          "{'transformer': ...}) to PipelineQuantizationConfig")

    @classmethod
    def from_dict(cls, *args: Any, **kwargs: Any) -> TransformersComponentConfig:
        """A transformers checkpoint naming ``quant_method: compressdit`` (none is written): the same line."""
        return cls()


TransformersComponentConfig.__init__.__signature__ = inspect.signature(CompressditConfig.__init__)


def register_with_diffusers() -> None:
    """Add the backend to diffusers' auto mappings (and to transformers' configs, for pipeline-level
    ``quant_backend="compressdit"``: :class:`TransformersComponentConfig`), and packed weights' logical shapes to
    its LoRA loaders (idempotent; there is no public plugin hook for either)."""
    from diffusers.quantizers import auto
    from transformers.quantizers import auto as transformers_auto

    auto.AUTO_QUANTIZER_MAPPING[CompressditMethod.COMPRESSDIT.value] = CompressditQuantizer
    auto.AUTO_QUANTIZATION_CONFIG_MAPPING[CompressditMethod.COMPRESSDIT.value] = CompressditConfig
    transformers_auto.AUTO_QUANTIZATION_CONFIG_MAPPING.setdefault(CompressditMethod.COMPRESSDIT.value,
                                                                  TransformersComponentConfig)
    register_lora_support()
    guard_projection_fusion()


#: attention projections diffusers' ``fuse_projections`` concatenates
FUSED_PROJECTIONS = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")


def guard_projection_fusion() -> None:
    """Make diffusers' ``fuse_projections`` (what ``model.fuse_qkv_projections()`` calls on each attention) refuse
    quantized projections with one clear line, before it changes anything (idempotent). Unguarded it built an
    ``nn.Linear`` of the codes' integer dtype ("Only Tensors of floating point and complex dtype can require
    gradients"); a no-op would not do: PixArt and SD3 then switch to fused attention processors, which read
    ``to_qkv``. Quantized query, key and value projections already quantize their shared input once."""
    from diffusers.models import attention, attention_processor

    for cls in (attention_processor.Attention, attention.AttentionModuleMixin):
        original = cls.__dict__.get("fuse_projections")
        if original is None or getattr(original, "compressdit_guard", False):
            continue

        def fuse_projections(self, *args, _original=original, **kwargs):
            quantized = [n for n in FUSED_PROJECTIONS if isinstance(getattr(self, n, None), QuantizedLinear)]
            if quantized:
                raise ValueError(f"fuse_qkv_projections: {type(self).__name__}.{quantized[0]} is quantized by "
                                 "compressdit, whose projections are not fused (they quantize their shared input "
                                 "once): leave them unfused")
            return _original(self, *args, **kwargs)

        fuse_projections.compressdit_guard = True
        fuse_projections.__doc__ = original.__doc__
        cls.fuse_projections = fuse_projections


def attach_quantizer(model, specs: dict[str, LinearQuantSpec], structure: dict | None = None) -> CompressditConfig:
    """Mark a model quantized in memory so that stock ``save_pretrained`` writes a loadable checkpoint.

    ``structure=None`` keeps the structure already attached (e.g. a width-pruned model's manifest).
    """
    if structure is None:
        previous = getattr(getattr(model, "hf_quantizer", None), "quantization_config", None)
        structure = previous.structure if isinstance(previous, CompressditConfig) else None
    config = CompressditConfig(modules={n: s.to_dict() for n, s in specs.items()}, structure=structure)
    model.register_to_config(quantization_config=config)
    model.hf_quantizer = CompressditQuantizer(config, pre_quantized=True)
    model.hf_quantizer.note_saved_as_is(model)
    model.is_quantized = True
    model.quantization_method = config.quant_method
    return config

"""Peer quantizers applied to the same layers for side-by-side baselines: bitsandbytes, torchao, NVIDIA ModelOpt.

bitsandbytes and torchao replace each layer on its own (round to nearest, no data). ModelOpt's recipes calibrate
(static activation ranges, SmoothQuant's and AWQ's scales): it quantizes the whole model at once, restricted to the
same layers, with a ``calibrate(model)`` loop the orchestrator builds from the calibration set (the candidate's
calibrate stage, else its defaults). ModelOpt simulates its formats off GPU (fake quantization, float weights in
memory: its packed kernels are TensorRT / GPU ones), so its memory and step time in a CPU report are the
simulation's; its quality is what its recipes give. torchao and ModelOpt are optional (``pip install torchao
nvidia-modelopt``, the ``bench`` / ``test`` extras): naming one without it stops with one line saying so."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import contextlib
import io
import warnings

import torch
from torch import nn

from compressdit.errors import ConfigError
from compressdit.registry import Registry


@dataclass(frozen=True)
class Peer:
    """``replace`` quantizes one linear on its own; ``quantize_model(model, names, calibrate)`` quantizes the named
    linears of the whole model with a calibration loop (``calibrate(model)`` runs the model on calibration data)."""

    description: str
    replace: Callable[[nn.Linear], nn.Module] | None = None
    quantize_model: Callable[[nn.Module, list[str], Callable[[nn.Module], None]], nn.Module] | None = None

    @property
    def calibrates(self) -> bool:
        return self.quantize_model is not None


PEERS: Registry[Peer] = Registry("peer baseline")


def _bnb():
    try:
        import bitsandbytes as bnb
    except ImportError as exc:  # pragma: no cover - install hint
        raise ImportError("peer baselines need `pip install bitsandbytes`") from exc
    return bnb


def _bnb_int8(linear: nn.Linear) -> nn.Module:
    bnb = _bnb()
    module = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                 has_fp16_weights=False, threshold=6.0)
    module.weight = bnb.nn.Int8Params(linear.weight.data.float().clone(), requires_grad=False, has_fp16_weights=False)
    if linear.bias is not None:
        module.bias = nn.Parameter(linear.bias.data.float().clone(), requires_grad=False)
    return module.to(linear.weight.device)


def _bnb_nf4(linear: nn.Linear) -> nn.Module:
    bnb = _bnb()
    module = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                               quant_type="nf4", compute_dtype=torch.float32)
    module.weight = bnb.nn.Params4bit(linear.weight.data.float().clone(), requires_grad=False, quant_type="nf4")
    if linear.bias is not None:
        module.bias = nn.Parameter(linear.bias.data.float().clone(), requires_grad=False)
    return module.to(linear.weight.device)


def _torchao(config_name: str) -> Callable[[nn.Linear], nn.Module]:
    def replace(linear: nn.Linear) -> nn.Module:
        try:
            from torchao import quantization
        except ImportError as exc:  # one line for the CLI
            raise ConfigError("baseline torchao-*: torchao is not installed (pip install torchao)") from exc
        module = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                           device=linear.weight.device, dtype=linear.weight.dtype)
        module.load_state_dict(linear.state_dict())
        quantization.quantize_(module, getattr(quantization, config_name)())  # the root Linear is replaced in place
        return module.requires_grad_(False)
    return replace


def _modelopt(config_name: str) -> Callable[[nn.Module, list[str], Callable[[nn.Module], None]], nn.Module]:
    """ModelOpt's ``config_name`` recipe (``mtq.<NAME>_CFG``) on exactly ``names``: its weight / input quantizer
    formats and its algorithm (max calibration, SmoothQuant, AWQ-lite) as shipped, every other quantizer off (its
    own name filters would also skip e.g. FLUX's single-block ``proj_out``, which the candidate quantizes)."""
    def quantize(model: nn.Module, names: list[str], calibrate: Callable[[nn.Module], None]) -> nn.Module:
        # ModelOpt warns at import (untested transformers versions) and for every layer left out of its algorithm,
        # and prints its progress ("Inserted N quantizers")
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.filterwarnings("ignore", module=r"modelopt\.")
            try:
                import modelopt.torch.quantization as mtq
            except ImportError as exc:  # one line for the CLI
                raise ConfigError("baseline modelopt-*: NVIDIA ModelOpt is not installed "
                                  "(pip install nvidia-modelopt)") from exc
            shipped = getattr(mtq, config_name)
            formats = [entry for entry in shipped["quant_cfg"]
                       if "cfg" in entry and entry["quantizer_name"] in ("*weight_quantizer", "*input_quantizer")]
            entries = [{"quantizer_name": "*", "enable": False}]
            entries += [{**entry, "quantizer_name": f"{name}.{entry['quantizer_name'][1:]}"}
                        for name in names for entry in formats]
            mtq.quantize(model, {**shipped, "quant_cfg": entries}, calibrate)
        return model.requires_grad_(False)
    return quantize


PEERS.add("bnb-int8", Peer("bitsandbytes LLM.int8 (W8, outlier threshold 6.0)", _bnb_int8))
PEERS.add("bnb-nf4", Peer("bitsandbytes NF4 (W4 weight-only, block 64)", _bnb_nf4))
PEERS.add("torchao-int8-dynamic", Peer("torchao W8A8: int8 weights per channel, dynamic int8 activations per token",
                                       _torchao("Int8DynamicActivationInt8WeightConfig")))
PEERS.add("torchao-int8-weight", Peer("torchao W8A16: int8 weight-only per channel",
                                      _torchao("Int8WeightOnlyConfig")))
_SIMULATED = " (simulated off GPU: fake-quantized, float weights in memory)"
PEERS.add("modelopt-int8-sq", Peer("NVIDIA ModelOpt INT8 SmoothQuant: W8 per channel, static per-tensor A8, "
                                   "SmoothQuant scales" + _SIMULATED, quantize_model=_modelopt("INT8_SMOOTHQUANT_CFG")))
PEERS.add("modelopt-fp8", Peer("NVIDIA ModelOpt FP8: E4M3 weights and static activations, per-tensor scales "
                               "(max calibration)" + _SIMULATED, quantize_model=_modelopt("FP8_DEFAULT_CFG")))
PEERS.add("modelopt-int4-awq", Peer("NVIDIA ModelOpt INT4 AWQ: W4A16, groups of 128, AWQ-lite scales" + _SIMULATED,
                                    quantize_model=_modelopt("INT4_AWQ_CFG")))
PEERS.add("modelopt-w4a8-awq", Peer("NVIDIA ModelOpt W4A8 AWQ: int4 weights in groups of 128 then FP8, static FP8 "
                                    "activations, AWQ-lite scales" + _SIMULATED,
                                    quantize_model=_modelopt("W4A8_AWQ_BETA_CFG")))


def apply_peer(model: nn.Module, names: list[str], peer: str,
               calibrate: Callable[[nn.Module], None] | None = None) -> nn.Module:
    """Quantize the named linears of ``model`` with the peer (in place); a calibrating peer runs ``calibrate``."""
    handler = PEERS.get(peer)
    if handler.calibrates:
        if calibrate is None:
            raise ConfigError(f"baseline {peer}: it calibrates, and no calibration loop was given")
        with torch.no_grad():
            return handler.quantize_model(model, list(names), calibrate)
    with torch.no_grad():
        return _replace_each(model, names, handler)


def _replace_each(model: nn.Module, names: list[str], handler: Peer) -> nn.Module:
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, handler.replace(getattr(parent, child)))
    return model

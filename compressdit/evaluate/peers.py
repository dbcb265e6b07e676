"""Peer quantizers applied to the same layers for side-by-side baselines: bitsandbytes and torchao.

torchao is optional (``pip install torchao``, the ``bench`` / ``test`` extras): naming a ``torchao-*`` baseline
without it stops with one line saying so."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from compressdit.errors import ConfigError
from compressdit.registry import Registry


@dataclass(frozen=True)
class Peer:
    description: str
    replace: Callable[[nn.Linear], nn.Module]


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


PEERS.add("bnb-int8", Peer("bitsandbytes LLM.int8 (W8, outlier threshold 6.0)", _bnb_int8))
PEERS.add("bnb-nf4", Peer("bitsandbytes NF4 (W4 weight-only, block 64)", _bnb_nf4))
PEERS.add("torchao-int8-dynamic", Peer("torchao W8A8: int8 weights per channel, dynamic int8 activations per token",
                                       _torchao("Int8DynamicActivationInt8WeightConfig")))
PEERS.add("torchao-int8-weight", Peer("torchao W8A16: int8 weight-only per channel",
                                      _torchao("Int8WeightOnlyConfig")))


@torch.no_grad()
def apply_peer(model: nn.Module, names: list[str], peer: str) -> nn.Module:
    """Replace the named linears of ``model`` by the peer's modules (in place)."""
    handler = PEERS.get(peer)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, handler.replace(getattr(parent, child)))
    return model

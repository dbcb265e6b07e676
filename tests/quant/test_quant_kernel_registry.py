"""A layer's prepacked kernel is rebuilt exactly when what its prepack read changed (``kernel_registry.StateKey``)."""

from __future__ import annotations

import pytest
import torch

from compressdit.quant.kernel_registry import cache_of
from compressdit.quant.layers import QuantLinear, QuantState
from compressdit.quant.spec import LinearQuantSpec


def _layer(seed: int = 0) -> QuantLinear:
    torch.manual_seed(seed)
    spec = LinearQuantSpec(w_bits=8, a_bits=8, balance=0.5)
    return QuantLinear.from_linear(torch.nn.Linear(64, 48), spec, input_absmax=torch.rand(64) * 4 + 0.1)


def _scale_in_place(layer):
    layer.weight_scale.mul_(2)


def _swap_storage(layer):  # .data = keeps the object and its version counter: only the storage tells
    layer.smooth_scale.data = layer.smooth_scale.data * 2


def _bias_in_place(layer):
    layer.bias.add_(1)


def _replace_object(layer):  # what accelerate's set_module_tensor_to_device does
    layer._parameters["weight_scale"] = QuantState(layer.weight_scale.data * 3)


def _load_state_dict(layer):
    layer.load_state_dict(_layer(seed=1).state_dict())


def _codes_in_place(layer):  # (writes through .data are invisible: .data has a version counter of its own)
    layer.weight[:, :3] = 0


@pytest.mark.parametrize("change", [_scale_in_place, _swap_storage, _bias_in_place, _replace_object,
                                    _load_state_dict, _codes_in_place])
def test_a_changed_saved_tensor_rebuilds_the_prepack(change):
    layer, x = _layer(), torch.randn(3, 5, 64)
    with torch.no_grad():
        layer(x)
        key = cache_of(layer).key
        layer(x)
        assert cache_of(layer).key is key  # nothing changed: no rebuild
        change(layer)
        out = layer(x)
        assert cache_of(layer).key is not key
        reference = layer.reference_forward(x)
    assert ((out - reference).norm() / reference.norm()).item() <= 1e-5


def test_a_new_thread_count_or_a_registered_tensor_rebuilds_the_prepack():
    layer, x = _layer(), torch.randn(4, 64)
    threads = torch.get_num_threads()
    with torch.no_grad():
        layer(x)
        key = cache_of(layer).key
        try:
            torch.set_num_threads(threads + 1)
            layer(x)
        finally:
            torch.set_num_threads(threads)
        assert cache_of(layer).key is not key
        key = cache_of(layer).key
        layer.input_scale = QuantState(torch.ones(()))  # None before: now a registered parameter
        layer(x)
        assert cache_of(layer).key is not key


def test_the_key_holds_the_prepacked_storage_so_its_address_cannot_come_back():
    layer = _layer()
    with torch.no_grad():
        layer(torch.randn(2, 64))
    prepacked = layer.weight_scale.data_ptr()
    for _ in range(3):  # a freed storage's address is often reused by the next allocation of its size
        layer.weight_scale.data = layer.weight_scale.data.clone()
    assert layer.weight_scale.data_ptr() != prepacked
    assert not cache_of(layer).key.holds_for(layer)

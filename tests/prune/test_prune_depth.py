"""Tests for compressdit.prune.depth (and the adapters' block stacks) on tiny random models of each family."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn

from compressdit.errors import ConfigError
from compressdit.models import ADAPTERS
from compressdit.models.text_conditions import synthetic_text
from compressdit.prune.depth import PassThrough, remove_blocks, skip_blocks
from tests.conftest import tiny_dit, tiny_flux, tiny_pixart, tiny_sd3

torch.set_num_threads(1)

FAMILIES = ("dit", "pixart", "sd3", "flux")
TEXT_SEQ, TEXT_DIM, POOLED_DIM = 5, 48, 40
DOUBLE, SINGLE = "transformer_blocks", "single_transformer_blocks"


@functools.lru_cache(maxsize=None)
def _built(family: str) -> nn.Module:
    if family == "dit":
        return tiny_dit(layers=3)
    if family == "pixart":
        return tiny_pixart(layers=3, caption_channels=TEXT_DIM)
    if family == "sd3":  # block 1 has SD3.5 dual attention; block 2 is context_pre_only
        return tiny_sd3(3, (1,), TEXT_DIM, POOLED_DIM)
    return tiny_flux(2, 3, 2, TEXT_DIM, POOLED_DIM)


def tiny_model(family: str) -> nn.Module:
    """A fresh copy of the tiny ``family`` model (3 blocks; Flux 2 double + 3 single), safe to prune."""
    return copy.deepcopy(_built(family))


def conditions(family: str, count: int = 2, seed: int = 0) -> list:
    if family == "dit":
        return [(7 * i + seed) % 1000 for i in range(count)]
    return synthetic_text(count, TEXT_SEQ, TEXT_DIM, POOLED_DIM if family in ("sd3", "flux") else None, seed=seed)


def sampling_adapter(family: str):
    """The family's adapter; text families get synthetic null conditions (no MiniLM text encoder needed)."""
    adapter = ADAPTERS.get(family)
    if adapter.condition_kind == "class":
        return adapter

    class SyntheticNull(type(adapter)):
        def null_conditions(self, count):
            return conditions(family, count, seed=99)

    return SyntheticNull()


def predict(family: str, model: nn.Module) -> torch.Tensor:
    """One fixed forward pass (same latents, timestep and conditions every call)."""
    adapter = ADAPTERS.get(family)
    latents = torch.randn(2, *adapter.latent_shape(model), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return adapter.predict(model, latents, torch.tensor([500.0]), adapter.encode(model, conditions(family)))


# block stacks ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_block_list_agrees_with_blocks_and_config(family: str) -> None:
    adapter, model = ADAPTERS.get(family), _built(family)
    listed = adapter.block_list(model)
    assert [(f"{stack}.{i}", block) for stack, i, block in listed] == adapter.blocks(model)
    for stack in adapter.block_stacks:
        assert len(getattr(model, stack.attribute)) == model.config[stack.config_key]
        assert adapter.block_stack(stack.attribute) is stack


def test_block_stack_lookup_names_the_stacks() -> None:
    with pytest.raises(ConfigError, match="single_transformer_blocks"):
        ADAPTERS.get("flux").block_stack("blocks")


# remove_blocks ---------------------------------------------------------------------------------------------

KEEP = {
    "dit": {DOUBLE: [0, 2]},
    "pixart": {DOUBLE: [2, 1]},  # order of the list does not matter
    "sd3": {DOUBLE: [1, 2]},  # the dual-attention block moves from index 1 to 0
    "flux": {DOUBLE: [1], SINGLE: [0, 2]},
}


@pytest.mark.parametrize("family", FAMILIES)
def test_removed_blocks_reload_with_stock_from_pretrained(family: str, tmp_path) -> None:
    adapter, model = ADAPTERS.get(family), tiny_model(family)
    kept_blocks = {stack: [getattr(model, stack)[i] for i in sorted(keep)] for stack, keep in KEEP[family].items()}
    assert remove_blocks(model, adapter, KEEP[family]) is model
    for stack, blocks in kept_blocks.items():
        assert list(getattr(model, stack)) == blocks
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    for stack in adapter.block_stacks:
        expected = len(KEEP[family].get(stack.attribute, getattr(_built(family), stack.attribute)))
        assert loaded.config[stack.config_key] == model.config[stack.config_key] == expected
        assert len(getattr(loaded, stack.attribute)) == expected
    reference = model.state_dict()
    assert loaded.state_dict().keys() == reference.keys()
    assert all(torch.equal(t, reference[k]) for k, t in loaded.state_dict().items())
    assert torch.equal(predict(family, loaded), predict(family, model))


def test_sd3_dual_attention_layers_are_renumbered(tmp_path) -> None:
    model = remove_blocks(tiny_model("sd3"), ADAPTERS.get("sd3"), {DOUBLE: [1, 2]})
    assert tuple(model.config.dual_attention_layers) == (0,)
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path)
    assert [b.attn2 is not None for b in loaded.transformer_blocks] == [True, False]
    assert [b.context_pre_only for b in loaded.transformer_blocks] == [False, True]


@pytest.mark.parametrize("family", FAMILIES)
def test_removing_nothing_is_the_identity(family: str) -> None:
    adapter, original = ADAPTERS.get(family), _built(family)
    everything = {stack.attribute: list(range(len(getattr(original, stack.attribute))))
                  for stack in adapter.block_stacks}
    for keep in ({}, everything):
        model = remove_blocks(tiny_model(family), adapter, keep)
        assert dict(model.config) == dict(original.config)
        assert torch.equal(predict(family, model), predict(family, original))


ERRORS = [
    ("dit", {"blocks": [0]}, "unknown block stack 'blocks'.*stacks: transformer_blocks"),
    ("dit", {DOUBLE: [0, 3]}, "index 3 out of range.*3 blocks"),
    ("dit", {DOUBLE: [-1]}, "index -1 out of range"),
    ("dit", {DOUBLE: [0, 0.5]}, "not an integer"),
    ("pixart", {DOUBLE: [1, 2, 1]}, r"\[1\].*more than once"),
    ("pixart", {DOUBLE: []}, "keeping no block"),
    ("flux", {SINGLE: []}, "keeping no block of single_transformer_blocks"),
    ("sd3", {DOUBLE: [0, 1]}, "last block.*index 2.*must stay"),
]


@pytest.mark.parametrize("family, keep, message", ERRORS)
def test_remove_blocks_rejects_bad_keep_maps_and_leaves_the_model(family: str, keep: dict, message: str) -> None:
    adapter, model = ADAPTERS.get(family), tiny_model(family)
    with pytest.raises(ConfigError, match=message) as info:
        remove_blocks(model, adapter, keep)
    assert "\n" not in str(info.value)
    assert dict(model.config) == dict(_built(family).config)
    assert [name for name, _ in adapter.blocks(model)] == [name for name, _ in adapter.blocks(_built(family))]


# skip_blocks -----------------------------------------------------------------------------------------------

SKIPS = [
    ("dit", {(DOUBLE, 0)}),  # the head then reads the next block's embedder, as after removal
    ("dit", {(DOUBLE, 1)}),
    ("pixart", {(DOUBLE, 0), (DOUBLE, 2)}),
    ("sd3", {(DOUBLE, 0)}),
    ("sd3", {(DOUBLE, 1)}),
    ("flux", {(DOUBLE, 0), (SINGLE, 1)}),
    ("flux", {(SINGLE, 0), (SINGLE, 2)}),
]


@pytest.mark.parametrize("family, skipped", SKIPS)
def test_skipping_equals_removing(family: str, skipped: set) -> None:
    adapter, model = ADAPTERS.get(family), tiny_model(family)
    before = [block for _, _, block in adapter.block_list(model)]
    full = predict(family, model)
    keep = {stack.attribute: [i for i in range(len(getattr(model, stack.attribute)))
                              if (stack.attribute, i) not in skipped] for stack in adapter.block_stacks}
    removed = predict(family, remove_blocks(tiny_model(family), adapter, keep))
    with skip_blocks(model, adapter, skipped):
        assert sum(isinstance(b, PassThrough) for _, _, b in adapter.block_list(model)) == len(skipped)
        skipped_out = predict(family, model)
    assert torch.equal(skipped_out, removed)
    assert not torch.equal(skipped_out, full)
    assert [block for _, _, block in adapter.block_list(model)] == before
    assert torch.equal(predict(family, model), full)


def test_pass_through_returns_the_inputs_in_the_block_output_structure() -> None:
    adapter, model = ADAPTERS.get("flux"), tiny_model("flux")
    hidden, text, temb = torch.randn(1, 4, 32), torch.randn(1, 3, 32), torch.randn(1, 32)
    with skip_blocks(model, adapter, {(SINGLE, 2)}):
        out = model.single_transformer_blocks[2](hidden_states=hidden, encoder_hidden_states=text, temb=temb)
    assert out[0] is text and out[1] is hidden
    dit_block = tiny_model("dit").transformer_blocks[1]
    assert PassThrough(dit_block, ADAPTERS.get("dit").block_stacks[0], dit_block)(hidden, timestep=None) is hidden


def test_skip_blocks_restores_after_an_exception() -> None:
    adapter, model = ADAPTERS.get("sd3"), tiny_model("sd3")
    before = list(model.transformer_blocks)
    with pytest.raises(RuntimeError, match="boom"):
        with skip_blocks(model, adapter, {(DOUBLE, 0), (DOUBLE, 2)}):
            raise RuntimeError("boom")
    assert list(model.transformer_blocks) == before


@pytest.mark.parametrize("skipped, message", [({("blocks", 0)}, "unknown block stack"),
                                              ({(DOUBLE, 5)}, "index 5 out of range")])
def test_skip_blocks_rejects_unknown_blocks(skipped: set, message: str) -> None:
    adapter, model = ADAPTERS.get("flux"), tiny_model("flux")
    before = [block for _, _, block in adapter.block_list(model)]
    with pytest.raises(ConfigError, match=message):
        with skip_blocks(model, adapter, skipped | {(SINGLE, 0)}):
            pass
    assert [block for _, _, block in adapter.block_list(model)] == before

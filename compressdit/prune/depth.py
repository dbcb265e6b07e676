"""Depth pruning: remove transformer blocks for good, or skip them for a while.

:func:`remove_blocks` edits the model in place so that stock ``save_pretrained`` + ``from_pretrained`` rebuild
it: the block ``ModuleList`` shrinks, state-dict keys renumber with it and the config's block count (and any
per-block index list, such as SD3.5's ``dual_attention_layers``) follows. :func:`skip_blocks` swaps blocks for
identities inside a ``with`` block and gives the same outputs as removing them.

    remove_blocks(model, adapter, {"transformer_blocks": [0, 2, 3]})   # drop block 1
    with skip_blocks(model, adapter, {("transformer_blocks", 1)}):
        ...                                                              # the same model, for now
"""

from __future__ import annotations

import inspect
import operator
from contextlib import contextmanager
from typing import Any, Iterable, Iterator

from torch import nn

from compressdit.errors import ConfigError
from compressdit.models.base import BlockStack, ModelAdapter

BlockKey = tuple[str, int]  # (stack attribute, index)


def block_inputs(block: nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """A block call's arguments by name (positional ones included), as its ``forward`` signature binds them."""
    return dict(inspect.signature(block.forward).bind(*args, **kwargs).arguments)


class PassThrough(nn.Module):
    """Stands in for a skipped block: returns the block's inputs in the block's output structure.

    The skipped block is not a submodule (its parameters leave ``state_dict`` while skipped). Attributes the
    model reads from the stack outside the block loop resolve to ``stand_in`` (DiT's head reads
    ``transformer_blocks[0].norm1.emb``), which :func:`skip_blocks` sets to the block that would hold that
    position after :func:`remove_blocks`.
    """

    def __init__(self, block: nn.Module, stack: BlockStack, stand_in: nn.Module) -> None:
        super().__init__()
        self.stack = stack
        object.__setattr__(self, "_block", block)
        object.__setattr__(self, "_stand_in", stand_in)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.stack.pack(block_inputs(self._block, args, kwargs))

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            stand_in = self.__dict__.get("_stand_in")
            if stand_in is None:
                raise
            return getattr(stand_in, name)


def _index(value: Any, stack: str, count: int, where: str) -> int:
    try:
        if isinstance(value, bool):
            raise TypeError
        index = operator.index(value)
    except TypeError:
        raise ConfigError(f"block index {value!r} of {stack} in {where} is not an integer") from None
    if not 0 <= index < count:
        raise ConfigError(f"block index {index} out of range for {stack} in {where}: it has {count} blocks "
                          f"(0..{count - 1})")
    return index


def _check_stacks(model: nn.Module, adapter: ModelAdapter, names: Iterable[str]) -> None:
    known = [s.attribute for s in adapter.block_stacks]
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise ConfigError(f"unknown block stack {', '.join(map(repr, unknown))} for {type(model).__name__}; "
                          f"stacks: {', '.join(known)}")


def kept_indices(model: nn.Module, adapter: ModelAdapter, keep: dict[str, Iterable[int]]) -> dict[str, list[int]]:
    """``keep`` checked and completed: every stack with its kept indices in execution order."""
    where = type(model).__name__
    _check_stacks(model, adapter, keep)
    plan = {}
    for stack in adapter.block_stacks:
        count = len(getattr(model, stack.attribute))
        indices = [_index(i, stack.attribute, count, where) for i in keep.get(stack.attribute, range(count))]
        repeated = sorted({i for i in indices if indices.count(i) > 1})
        if repeated:
            raise ConfigError(f"block indices {repeated} of {stack.attribute} in {where} are listed more than once; "
                              "list each kept block once")
        if not indices:
            raise ConfigError(f"keeping no block of {stack.attribute} in {where}; keep at least one")
        if stack.keep_last and count - 1 not in indices:
            raise ConfigError(f"the last block of {stack.attribute} in {where} (index {count - 1}) is of another "
                              "kind and must stay; add it to the kept indices")
        plan[stack.attribute] = sorted(indices)
    return plan


def remove_blocks(model: nn.Module, adapter: ModelAdapter, keep: dict[str, Iterable[int]]) -> nn.Module:
    """Keep only the listed blocks of each stack (a stack not in ``keep`` keeps all), in place.

    Kept blocks stay in their original order whatever the order of the list. Returns ``model``, whose config
    now rebuilds exactly this model with stock ``from_pretrained``.
    """
    plan = kept_indices(model, adapter, keep)
    for stack in adapter.block_stacks:
        indices = plan[stack.attribute]
        blocks = getattr(model, stack.attribute)
        setattr(model, stack.attribute, nn.ModuleList([blocks[i] for i in indices]))
        updates: dict[str, Any] = {stack.config_key: len(indices)}
        renumber = {old: new for new, old in enumerate(indices)}
        for key in stack.index_keys:
            old = model.config.get(key) or ()
            updates[key] = tuple(renumber[i] for i in old if i in renumber)
        model.register_to_config(**updates)
    return model


@contextmanager
def skip_blocks(model: nn.Module, adapter: ModelAdapter, skipped: Iterable[BlockKey]) -> Iterator[nn.Module]:
    """Inside the ``with`` block, each ``(stack, index)`` in ``skipped`` passes its inputs through unchanged.

    Outputs equal those of the model after ``remove_blocks`` of the same blocks. ``keep_last`` blocks may be
    skipped here (to measure them); the blocks are put back on exit, also after an exception.
    """
    where = type(model).__name__
    skipped = set(skipped)
    _check_stacks(model, adapter, {stack for stack, _ in skipped})
    swapped: list[tuple[nn.ModuleList, int, nn.Module]] = []
    try:
        for stack in adapter.block_stacks:
            blocks = getattr(model, stack.attribute)
            chosen = {_index(i, stack.attribute, len(blocks), where) for name, i in skipped
                      if name == stack.attribute}
            kept = [block for i, block in enumerate(blocks) if i not in chosen]
            for i in sorted(chosen):
                block = blocks[i]
                stand_in = kept[0] if i == 0 and kept else block
                blocks[i] = PassThrough(block, stack, stand_in)
                swapped.append((blocks, i, block))
        yield model
    finally:
        for blocks, i, block in reversed(swapped):
            blocks[i] = block

"""Block calls recorded to disk and replayed (compressdit.calibration.block_inputs)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compressdit.calibration.block_inputs import BlockInputCache
from compressdit.errors import CalibrationError


class Block(nn.Module):
    """Positional and keyword inputs, a tuple of tensors and a None among them, as diffusers blocks take."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x, temb=None, rotary=None, attention_kwargs=None):
        cos, sin = rotary
        return self.proj(x * cos + sin) + temb[:, None]


def _blocks():
    torch.manual_seed(0)
    return [("blocks.0", Block().eval()), ("blocks.1", Block().eval())]


def _calls(n: int):
    gen = torch.Generator().manual_seed(1)
    wide = torch.randn(2, 6, 16, generator=gen)
    return [((wide[..., :8],), {"temb": torch.randn(2, 8, generator=gen), "attention_kwargs": None,
                                "rotary": (torch.randn(6, 8, generator=gen), torch.randn(6, 8, generator=gen))})
            for _ in range(n)]


@torch.no_grad()
def test_replay_calls_each_block_with_its_recorded_inputs_in_order(tmp_path):
    blocks = _blocks()
    seen: dict[str, list] = {"live": [], "replayed": []}
    calls = _calls(3)
    with BlockInputCache(tmp_path, blocks, calls_per_block=3, budget_bytes=10 ** 6, budget_what="--max-cache") as cache:
        with cache.recording():
            for args, kwargs in calls:
                for _, block in blocks:
                    seen["live"].append(block(*args, **kwargs))
        assert not any(block._forward_pre_hooks for _, block in blocks)
        assert cache.calls == {"blocks.0": 3, "blocks.1": 3} and len(list(cache.folder.iterdir())) == 6
        # a view of a 16-wide tensor is stored as its own 8 columns: 2*6*8 + 2*8 + 2*6*8 floats per call
        assert cache.written == 6 * 4 * (96 + 16 + 96)
        for prefix, block in blocks:
            handle = block.register_forward_hook(lambda m, a, out: seen["replayed"].append(out))
            cache.replay(prefix, block)
            handle.remove()
        folder = cache.folder
    live = seen["live"][0::2] + seen["live"][1::2]  # block 0's calls, then block 1's
    assert all(torch.equal(a, b) for a, b in zip(live, seen["replayed"], strict=True))
    assert not folder.exists()


def test_a_cache_estimated_over_the_budget_is_refused_at_the_first_call_in_one_line(tmp_path):
    blocks = _blocks()
    (args, kwargs), = _calls(1)
    with pytest.raises(CalibrationError, match=r"about 0\.02 MB \(2 blocks x 10 calls x 0\.00 MB\) but the stated "
                                               r"budget is 0\.01 MB; calibrate on fewer samples or steps") as caught, \
            BlockInputCache(tmp_path, blocks, calls_per_block=10, budget_bytes=10 ** 4,
                            budget_what="the stated budget") as cache, cache.recording():
        blocks[0][1](*args, **kwargs)
    assert "\n" not in str(caught.value) and cache.written == 0 and list(tmp_path.iterdir()) == []
    assert not any(block._forward_pre_hooks for _, block in blocks)


def test_more_calls_than_estimated_are_still_held_to_the_budget(tmp_path):
    blocks = _blocks()
    calls = _calls(3)
    per_call = 4 * (96 + 16 + 96)
    with pytest.raises(CalibrationError, match="but --max-cache is"), \
            BlockInputCache(tmp_path, blocks[:1], calls_per_block=1, budget_bytes=2 * per_call,
                            budget_what="--max-cache") as cache, cache.recording():
        for args, kwargs in calls:
            blocks[0][1](*args, **kwargs)
    assert cache.calls == {"blocks.0": 2} and list(tmp_path.iterdir()) == []

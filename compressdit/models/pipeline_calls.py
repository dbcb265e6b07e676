"""How a diffusers pipeline's ``__call__`` takes what compressdit passes it: facts per pipeline class, as data.

The sampling of pipelines without a family adapter (:mod:`compressdit.models.driven`) calls the stock ``__call__``
with the recipe's guidance, steps and size. Most pipelines take classifier-free guidance as ``guidance_scale``;
the ones listed in :data:`GUIDANCE` take it another way (Qwen-Image and HunyuanVideo: ``true_cfg_scale``, and
guidance runs only when a negative prompt is given, while their ``guidance_scale`` feeds a guidance-distilled
embedding). A pipeline subclass inherits its base class's entry. ``size`` is the resolution the transformer
sees: where ``__call__`` takes ``use_resolution_binning`` (PixArt, Sana, HunyuanDiT), a given size turns it off
unless the stage's ``call`` sets it, since binning would sample at the nearest trained bin instead
(768-1024 px for most) and resize the result.

Adding a family that takes guidance another way is one entry::

    GUIDANCE["QwenImagePipeline"] = GuidanceCall(scale="true_cfg_scale", negative="negative_prompt")
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass


@dataclass(frozen=True)
class GuidanceCall:
    """The ``__call__`` keyword that takes the classifier-free guidance scale and, where guidance runs only with a
    negative prompt, the keyword that takes one (an empty negative prompt per prompt, the stock unconditional)."""

    scale: str = "guidance_scale"
    negative: str | None = None

    def options(self, guidance: float, prompts: int) -> dict:
        options = {self.scale: guidance}
        if self.negative is not None and guidance > 1:
            options[self.negative] = [""] * prompts
        return options


STOCK = GuidanceCall()
TRUE_CFG = GuidanceCall(scale="true_cfg_scale", negative="negative_prompt")
GUIDANCE: dict[str, GuidanceCall] = {
    "QwenImagePipeline": TRUE_CFG,
    "QwenImage21Pipeline": TRUE_CFG,
    "HunyuanVideoPipeline": TRUE_CFG,
}
BINNING = "use_resolution_binning"


def guidance_call(pipeline_class: type) -> GuidanceCall:
    """The entry of the nearest class in ``pipeline_class``'s MRO; ``guidance_scale`` where none is listed."""
    return next((GUIDANCE[c.__name__] for c in pipeline_class.__mro__ if c.__name__ in GUIDANCE), STOCK)


def call_parameters(pipeline_class: type) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(pipeline_class.__call__).parameters)


def size_options(pipeline_class: type, size: int) -> dict:
    """``height`` / ``width`` of ``size`` px, with resolution binning off where the pipeline bins."""
    options = {"height": size, "width": size}
    if BINNING in call_parameters(pipeline_class):
        options[BINNING] = False
    return options

"""How a diffusers pipeline's ``__call__`` takes what compressdit passes it: facts per pipeline class, as data.

The sampling of pipelines without a family adapter (:mod:`compressdit.models.driven`) calls the stock ``__call__``
with the recipe's guidance, steps and size. Most pipelines take classifier-free guidance as ``guidance_scale``;
the ones listed in :data:`GUIDANCE` take it another way (Qwen-Image and HunyuanVideo: ``true_cfg_scale``, and
guidance runs only when a negative prompt is given, while their ``guidance_scale`` feeds a guidance-distilled
embedding). A pipeline subclass inherits its base class's entry. ``size`` is the resolution the transformer
sees: where ``__call__`` takes ``use_resolution_binning`` (PixArt, Sana, HunyuanDiT), a given size turns it off
unless the stage's ``call`` sets it, since binning would sample at the nearest trained bin instead
(768-1024 px for most) and resize the result.

:data:`PREPARE` lists what a family's stock example calls on a loaded pipeline (Allegro's VAE decodes only tiled);
:data:`OPTIONAL_NAMES` names the package behind a name a pipeline module defines only when that package is
installed (SkyReels-V2 calls ``ftfy`` unguarded; OmniGen's processor needs ``torchvision``), for the one-line error.

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
    "EasyAnimatePipeline": GuidanceCall(negative="negative_prompt"),  # its encode_prompt needs one under guidance
}
BINNING = "use_resolution_binning"

#: methods called on a loaded pipeline before it samples: what the family's stock example does first
PREPARE: dict[str, tuple[str, ...]] = {
    "AllegroPipeline": ("vae.enable_tiling",),  # its VAE decodes only tiled
}
#: a name a pipeline module defines only when an optional package imports -> that package
OPTIONAL_NAMES: dict[str, str] = {"ftfy": "ftfy", "OmniGenMultiModalProcessor": "torchvision", "bs4": "beautifulsoup4"}


def _entry(table: dict, pipeline_class: type, default):
    return next((table[c.__name__] for c in pipeline_class.__mro__ if c.__name__ in table), default)


def guidance_call(pipeline_class: type) -> GuidanceCall:
    """The entry of the nearest class in ``pipeline_class``'s MRO; ``guidance_scale`` where none is listed."""
    return _entry(GUIDANCE, pipeline_class, STOCK)


def prepare(pipe) -> None:
    """Call the :data:`PREPARE` methods of ``pipe``'s class on it (``"vae.enable_tiling"`` calls
    ``pipe.vae.enable_tiling()``)."""
    for path in _entry(PREPARE, type(pipe), ()):
        target = pipe
        for name in path.split("."):
            target = getattr(target, name)
        target()


def missing_package(exc: NameError) -> str:
    """``pip install X`` for a name that a pipeline module left undefined because an optional package is missing."""
    return f"pip install {OPTIONAL_NAMES.get(exc.name, 'the package that defines ' + repr(exc.name))}"


def call_parameters(pipeline_class: type) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(pipeline_class.__call__).parameters)


def size_options(pipeline_class: type, size: int) -> dict:
    """``height`` / ``width`` of ``size`` px, with resolution binning off where the pipeline bins."""
    options = {"height": size, "width": size}
    if BINNING in call_parameters(pipeline_class):
        options[BINNING] = False
    return options

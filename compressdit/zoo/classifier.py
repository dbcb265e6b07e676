"""Small Fashion-MNIST CNN whose penultimate features serve the FD-FMNIST metric."""

from __future__ import annotations

import torch
from torch import nn


class FashionClassifier(nn.Module):
    """Three conv blocks (32/64/128) + a 128-d feature layer + 10-way head."""

    feature_dim = 128

    def __init__(self) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                nn.MaxPool2d(2),
            )

        self.body = nn.Sequential(block(1, 32), block(32, 64), block(64, 128))
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(128 * 4 * 4, 128), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(128, 10))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """128-d features of images in [-1, 1], shape [N, 1, 32, 32]."""
        return self.features(self.body(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(images))

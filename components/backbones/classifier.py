"""The deployable network: uint8 images in, class probabilities out.

Preprocessing (scale, mean/std) and the softmax live inside the module, so
the exported ONNX graph is self-contained and consumers need no Graft code.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class Preprocess(nn.Module):
    """N x H x W x 3 uint8 -> N x 3 x H x W float, normalised with the backbone's mean/std."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).to(torch.float32) / 255.0
        return (x - self.mean) / self.std


class GraftClassifier(nn.Module):
    """Preprocess -> backbone features -> linear head -> softmax(logits / temperature)."""

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        num_classes: int,
        mean: Sequence[float],
        std: Sequence[float],
        temperature: float = 1.0,
    ) -> None:
        super().__init__()
        self.preprocess = Preprocess(mean, std)
        self.backbone = backbone
        self.head = nn.Linear(feature_dim, num_classes)
        self.register_buffer("temperature", torch.tensor(float(temperature)))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features of a uint8 image batch."""
        return self.backbone(self.preprocess(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.head(self.features(images)) / self.temperature, dim=1)

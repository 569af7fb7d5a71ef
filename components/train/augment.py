"""Training-time augmentation with `torchvision.transforms.v2`.

Augmentation works on the same uint8 N x H x W x 3 batches the deployed model
takes, before its own preprocessing, so nothing about normalisation changes.
Each image gets its own random parameters (a v2 transform called on a batch
would give the whole batch the same crop). Randomness comes from torch's
global generator, which training seeds and checkpoints, so a seeded run is
repeatable and a resumed run continues the same sequence.
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2

from components.core.config import TrainConfig


class Augmenter:
    """Random crop, rotation, colour jitter and (optionally) flips, per image."""

    def __init__(self, cfg: TrainConfig, image_size: int) -> None:
        steps: list[v2.Transform] = []
        if cfg.augment_crop_scale < 1.0:
            steps.append(v2.RandomResizedCrop(image_size, scale=(cfg.augment_crop_scale, 1.0), antialias=True))
        if cfg.augment_flip:
            steps.append(v2.RandomHorizontalFlip())
        if cfg.augment_rotate > 0:
            steps.append(v2.RandomRotation(cfg.augment_rotate))
        if cfg.augment_color > 0:
            strength = cfg.augment_color
            steps.append(v2.ColorJitter(brightness=strength, contrast=strength, saturation=strength))
        self.transform = v2.Compose(steps) if steps else None
        self.steps = steps

    def describe(self) -> str:
        """One line for the log, e.g. 'RandomResizedCrop(...), RandomRotation(...)'."""
        return ", ".join(type(step).__name__ for step in self.steps) or "no transform (every augment_* setting is off)"

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Augment a uint8 N x H x W x 3 batch; returns the same shape and dtype."""
        if self.transform is None:
            return images
        channels_first = images.permute(0, 3, 1, 2)
        out = torch.stack([self.transform(image) for image in channels_first])
        return out.permute(0, 2, 3, 1).contiguous()

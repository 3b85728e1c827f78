"""Training-time augmentation of uint8 images with torchvision transforms v2, seeded by a named generator.

The transforms are torchvision's own (``RandomResizedCrop``, ``RandomHorizontalFlip``,
``ColorJitter``; the recipe FEAT and most Mini-ImageNet code bases use). Those draw
their parameters from torch's global generator, so each episode's batch is
transformed inside ``torch.random.fork_rng`` with the global generator seeded from
the run's own augmentation ``torch.Generator``: results depend only on that
generator, and the global state is left as it was. Images are transformed one by
one (each gets its own crop, flip and jitter) within that one seeded block per
episode; ``benchmarks/data_pipeline.py`` measures the cost against a training step.
Evaluation never augments.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision.transforms import v2

from fewshot_nsl.errors import UserError


@dataclass(frozen=True)
class Augmentation:
    """``crop_scale``: smallest crop area fraction of RandomResizedCrop; ``jitter``: ColorJitter's
    brightness/contrast/saturation strength (0: none; gray images get brightness and contrast only);
    ``flip``: random horizontal flips."""

    crop_scale: float = 0.08
    jitter: float = 0.4
    flip: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.crop_scale <= 1:
            raise UserError(f"augment_crop_scale must be in (0, 1], got {self.crop_scale}")
        if not 0 <= self.jitter < 1:
            raise UserError(f"augment_jitter must be in [0, 1), got {self.jitter}")

    @property
    def label(self) -> str:
        """Short text for leaderboard rows, e.g. ``rrc0.08-flip-jitter0.4``."""
        parts = [f"rrc{self.crop_scale:g}"] + (["flip"] if self.flip else []) + ([f"jitter{self.jitter:g}"] if self.jitter else [])
        return "-".join(parts)

    def transform(self, size: int, channels: int) -> v2.Compose:
        steps: list[v2.Transform] = [v2.RandomResizedCrop(size, scale=(self.crop_scale, 1.0), antialias=True)]
        if self.flip:
            steps.append(v2.RandomHorizontalFlip())
        if self.jitter:
            colour = {"saturation": self.jitter} if channels == 3 else {}
            steps.append(v2.ColorJitter(brightness=self.jitter, contrast=self.jitter, **colour))
        return v2.Compose(steps)

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """uint8 (B, C, H, W) → uint8 (B, C, H, W), each image transformed with its own draws."""
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != images.shape[-2]:
            raise ValueError(f"augmentation takes uint8 (B, C, S, S) images, got {images.dtype} {tuple(images.shape)}")
        transform = self.transform(images.shape[-1], images.shape[1])
        seed = int(torch.randint(0, 2**62, (), generator=generator))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return torch.stack([transform(image) for image in images])

"""Outside images prepared exactly as a dataset prepares its own: decode, channels, resize, normalise.

A user who scores their own pictures with a trained learner must feed them through the same
steps the training images went through, or the comparison is off before it starts:

* Omniglot (``omniglot``): grayscale, inverted so ink is 1 and paper 0, resized with
  antialiasing to ``image_size`` as ``fewshot_nsl.data.omniglot`` resizes the characters
  (an original Omniglot PNG comes out exactly as the dataset's own copy), scaled to [0, 1];
* Mini-ImageNet (``miniimagenet``): RGB, both sides resized to ``image_size`` (how the 84×84
  files were made), ImageNet mean and std;
* an image folder (any other dataset name): the shorter side resized and the centre cropped,
  alpha dropped, mean = std = 0.5; a 1-channel model gets the luminance, a 3-channel model
  gets gray images repeated to three channels, as the folder reader does.

``Preprocess.uint8`` gives the image as the dataset stores it; calling the object also
standardises, as ``ImageClassSet.to_float`` does.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torchvision.io import ImageReadMode
from torchvision.transforms.v2 import functional as TF

from fewshot_nsl.data.dataset import standardise
from fewshot_nsl.data.image_folder import FOLDER_MEAN, FOLDER_STD, iter_decoded, resize_square
from fewshot_nsl.data.miniimagenet import IMAGENET_MEAN, IMAGENET_STD
from fewshot_nsl.data.omniglot import OMNIGLOT_MEAN, OMNIGLOT_STD, resize_ink
from fewshot_nsl.errors import UserError

ImageSource = str | os.PathLike | torch.Tensor  # a file, or a decoded uint8 (C, H, W) tensor


@dataclass(frozen=True)
class Preprocess:
    """Callable: image sources → float (N, channels, image_size, image_size), ready for a learner."""

    dataset: str
    image_size: int
    channels: int

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise UserError(f"models take 1 or 3 image channels, not {self.channels}")

    def __call__(self, sources: Sequence[ImageSource]) -> torch.Tensor:
        images = torch.stack([self.uint8(source) for source in sources])
        return standardise(images, *self.statistics)

    @property
    def statistics(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """The (mean, std) per channel the dataset standardises with."""
        if self.dataset == "omniglot":
            return OMNIGLOT_MEAN, OMNIGLOT_STD
        if self.dataset == "miniimagenet":
            return IMAGENET_MEAN, IMAGENET_STD
        return (FOLDER_MEAN,) * self.channels, (FOLDER_STD,) * self.channels

    def uint8(self, source: ImageSource) -> torch.Tensor:
        """uint8 (channels, image_size, image_size), as the dataset stores its own images."""
        if self.dataset == "omniglot":
            gray = _decoded(source, ImageReadMode.GRAY)[:1]
            return resize_ink(1.0 - gray.float().div(255.0).unsqueeze(0), self.image_size)[0]
        if self.dataset == "miniimagenet":
            return resize_square(_decoded(source, ImageReadMode.RGB)[:3], self.image_size, crop=False)
        image = _decoded(source, ImageReadMode.UNCHANGED)
        image = image[:1] if image.shape[0] in (1, 2) else image[:3]  # drop alpha
        if self.channels == 1 and image.shape[0] == 3:
            image = TF.rgb_to_grayscale(image)
        elif self.channels == 3 and image.shape[0] == 1:
            image = image.expand(3, -1, -1)
        return resize_square(image.contiguous(), self.image_size, crop=True)


def _decoded(source: ImageSource, mode: ImageReadMode) -> torch.Tensor:
    if isinstance(source, torch.Tensor):
        if source.dtype != torch.uint8 or source.dim() != 3:
            raise UserError(f"an image tensor must be uint8 (C, H, W), got {source.dtype} {tuple(source.shape)}")
        if source.shape[0] not in (1, 2, 3, 4):
            raise UserError(f"an image tensor needs 1-4 channels (gray, gray+alpha, RGB, RGBA), got {source.shape[0]}")
        colour = source[:3] if source.shape[0] >= 3 else source[:1]  # alpha dropped
        if mode == ImageReadMode.GRAY and colour.shape[0] == 3:
            return TF.rgb_to_grayscale(colour)
        if mode == ImageReadMode.RGB and colour.shape[0] == 1:
            return colour.expand(3, -1, -1)
        return colour if mode != ImageReadMode.UNCHANGED else source
    path = Path(source).expanduser()
    if not path.is_file():
        raise UserError(f"image file {path} does not exist")
    return next(iter_decoded([path], mode))

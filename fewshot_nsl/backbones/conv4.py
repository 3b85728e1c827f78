"""Conv-4 (Vinyals et al. 2016; Snell et al. 2017): four conv3×3-BN-ReLU-maxpool2 blocks."""

from __future__ import annotations

import torch
from torch import nn

from fewshot_nsl.backbones.similarity import PLAIN, Similarity
from fewshot_nsl.errors import UserError


class Conv4(nn.Module):
    """Maps (B, C, H, W) to flat features (B, out_features).

    ``plain_stem`` keeps the first layer an ordinary convolution: on one input
    channel a 3×3 tap mixing has little to mix, and the stem dominates cost
    at full resolution.
    """

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        width: int = 64,
        similarity: Similarity = PLAIN,
        plain_stem: bool = False,
        blocks: int = 4,
    ):
        super().__init__()
        channels, height, width_px = image_shape
        layers: list[nn.Module] = []
        for index in range(blocks):
            chooser = PLAIN if (index == 0 and plain_stem) else similarity
            layers += [
                chooser.conv3x3(channels if index == 0 else width, width),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            height, width_px = height // 2, width_px // 2
        if height < 1 or width_px < 1:
            raise UserError(f"images of {image_shape[1:]} pixels are too small for {blocks} pooling blocks; raise --image-size")
        self.features = nn.Sequential(*layers)
        self.out_features = width * height * width_px

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(images).flatten(1)

"""Conv-4 (Vinyals et al. 2016; Snell et al. 2017): four conv3×3-BN-ReLU-maxpool2 blocks.

``downsample="stride"`` is Finn et al. (2017)'s Omniglot variant (github.com/cbfinn/maml,
utils.conv_block without ``--max_pool`` and maml.forward_conv): each 3×3 convolution has
stride 2 instead of a max-pool after it, and the features are the mean over the final
positions (64 values) instead of the flattened map. Padding is symmetric (PyTorch's
``padding=1``); TensorFlow's ``SAME`` at stride 2 pads only the bottom/right edge of even
sizes (28, 14, 4), which gives the same sizes (28 → 14 → 7 → 4 → 2) on a one-pixel-shifted grid.
"""

from __future__ import annotations

import torch
from torch import nn

from fewshot_nsl.backbones.similarity import PLAIN, Similarity
from fewshot_nsl.errors import UserError


DOWNSAMPLING = ("maxpool", "stride")


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
        downsample: str = "maxpool",
    ):
        super().__init__()
        if downsample not in DOWNSAMPLING:
            raise UserError(f"unknown Conv-4 downsampling {downsample!r}; choose one of {', '.join(DOWNSAMPLING)}")
        self.downsample = downsample
        strided = downsample == "stride"
        channels, height, width_px = image_shape
        layers: list[nn.Module] = []
        for index in range(blocks):
            chooser = PLAIN if (index == 0 and plain_stem) else similarity
            layers += [
                chooser.conv3x3(channels if index == 0 else width, width, stride=2 if strided else 1),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            ]
            if strided:
                height, width_px = (height + 1) // 2, (width_px + 1) // 2
            else:
                layers.append(nn.MaxPool2d(2))
                height, width_px = height // 2, width_px // 2
        if height < 1 or width_px < 1:
            raise UserError(f"images of {image_shape[1:]} pixels are too small for {blocks} pooling blocks; raise --image-size")
        self.features = nn.Sequential(*layers)
        self.out_features = width if strided else width * height * width_px

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        maps = self.features(images)
        return maps.mean((2, 3)) if self.downsample == "stride" else maps.flatten(1)

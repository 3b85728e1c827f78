"""ResNet-12 as used by MetaOptNet (Lee et al. 2019) and FEAT (Ye et al. 2020).

Four residual blocks of three 3×3 convolutions (widths 64-160-320-640, about
12.4M parameters), each followed by BatchNorm and LeakyReLU(0.1), a 1×1
projection shortcut, a 2×2 max-pool per block and optional DropBlock; global
average pooling gives 640-d features. ``NARROW_WIDTHS`` (64-128-256-512, as in
TADAM, Oreshkin et al. 2018) is a different network that papers also call
ResNet-12; here it has its own name, ``resnet12-512``.
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from fewshot_nsl.backbones.similarity import PLAIN, Similarity

WIDTHS = (64, 160, 320, 640)
NARROW_WIDTHS = (64, 128, 256, 512)


class DropBlock(nn.Module):
    """DropBlock (Ghiasi et al. 2018) drawing its mask from a named generator.

    Zeroes ``block_size``×``block_size`` squares so that about ``drop_rate`` of
    the activations are dropped, then rescales the rest; identity in eval mode.
    The generator is required: masks drawn from torch's global generator would
    make a training irreproducible from its seed (the trainer passes one seeded
    from the run's seed and rank, and saves its state in checkpoints).
    """

    def __init__(self, drop_rate: float, block_size: int, generator: torch.Generator):
        super().__init__()
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}")
        self.drop_rate, self.block_size, self.generator = drop_rate, block_size, generator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_rate == 0.0:
            return x
        height, width = x.shape[-2:]
        size = min(self.block_size, height, width)
        valid = (height - size + 1) * (width - size + 1)
        gamma = self.drop_rate * height * width / (size**2 * valid)
        seeds_shape = (x.shape[0], x.shape[1], height - size + 1, width - size + 1)
        probabilities = torch.full(seeds_shape, gamma, dtype=x.dtype)
        seeds = torch.bernoulli(probabilities, generator=self.generator).to(x.device)
        pad = size - 1
        blocks = F.max_pool2d(F.pad(seeds, (pad, pad, pad, pad)), size, stride=1)
        keep = 1.0 - blocks
        return x * keep * (keep.numel() / keep.sum().clamp_min(1.0))


class ResidualBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, similarity: Similarity, dropblock: DropBlock | None):
        super().__init__()
        self.body = nn.Sequential(
            similarity.conv3x3(in_channels, out_channels),
            nn.BatchNorm2d(out_channels),
            nn.LeakyReLU(0.1),
            similarity.conv3x3(out_channels, out_channels),
            nn.BatchNorm2d(out_channels),
            nn.LeakyReLU(0.1),
            similarity.conv3x3(out_channels, out_channels),
            nn.BatchNorm2d(out_channels),
        )
        self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels))
        self.pool = nn.MaxPool2d(2, ceil_mode=True)
        self.dropblock = dropblock if dropblock is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropblock(self.pool(F.leaky_relu(self.body(x) + self.shortcut(x), 0.1)))


class ResNet12(nn.Module):
    """Maps (B, C, H, W) to ``widths[-1]``-d features (B, out_features): 640 by default.

    ``generator`` draws DropBlock's masks; required when ``drop_rate > 0``.
    """

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        similarity: Similarity = PLAIN,
        widths: tuple[int, ...] = WIDTHS,
        drop_rate: float = 0.0,
        dropblock_size: int = 5,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        if drop_rate > 0 and generator is None:
            raise ValueError("drop_rate > 0 needs a generator to draw DropBlock's masks from")
        blocks, channels = [], image_shape[0]
        for index, width in enumerate(widths):
            # DropBlock only in the last two blocks, as in MetaOptNet.
            dropblock = DropBlock(drop_rate, dropblock_size, generator) if drop_rate > 0 and index >= 2 else None
            blocks.append(ResidualBlock(channels, width, similarity, dropblock))
            channels = width
        self.blocks = nn.Sequential(*blocks)
        self.out_features = channels

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.blocks(images).mean(dim=(2, 3))

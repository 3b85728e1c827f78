"""Feature extractors. A backbone never knows which learner trains it."""

from __future__ import annotations

import torch
from torch import nn

from fewshot_nsl.backbones.conv4 import Conv4
from fewshot_nsl.backbones.resnet12 import NARROW_WIDTHS, WIDTHS, ResNet12
from fewshot_nsl.backbones.similarity import Similarity
from fewshot_nsl.backbones.weights import WEIGHTS, apply_weights, check_weights
from fewshot_nsl.errors import UserError

BACKBONES = ("conv4", "nsl-conv4", "resnet12", "nsl-resnet12", "resnet12-512", "nsl-resnet12-512")


def resolve_similarity(backbone: str, similarity: str | None, form: str = "diagonal", hidden: int = 64) -> Similarity:
    """``nsl-*`` backbones default to static NSL; plain ones refuse an NSL similarity."""
    if backbone not in BACKBONES:
        raise UserError(f"unknown backbone {backbone!r}; choose one of {', '.join(BACKBONES)}")
    if backbone.startswith("nsl-"):
        kind = similarity or "static"
        if kind == "conv":
            raise UserError(f"--similarity conv makes {backbone} a plain network; use --backbone {backbone[4:]}")
        return Similarity(kind, form, hidden)
    if similarity not in (None, "conv"):
        raise UserError(f"--similarity {similarity} needs an NSL backbone; use --backbone nsl-{backbone}")
    return Similarity()


def build_backbone(
    name: str,
    image_shape: tuple[int, int, int],
    similarity: Similarity | None = None,
    width: int = 64,
    plain_stem: bool = False,
    drop_rate: float = 0.0,
    generator: torch.Generator | None = None,
    conv4_downsample: str = "maxpool",
    weights: str = "real",
) -> nn.Module:
    """Build a backbone by name; ``similarity`` defaults as in ``resolve_similarity``.

    ``width`` is the Conv-4 filter count (ResNet-12 widths are fixed); ``weights`` is one of
    ``WEIGHTS`` (binary and random-frozen: plain backbones only, see ``backbones.weights``).
    """
    similarity = similarity or resolve_similarity(name, None)
    if name.startswith("nsl-") == (similarity.kind == "conv"):
        raise UserError(f"backbone {name} does not match similarity {similarity.label}")
    check_weights(weights, nsl=similarity.kind != "conv")
    if name.endswith("conv4"):
        model: nn.Module = Conv4(
            image_shape, width=width, similarity=similarity, plain_stem=plain_stem, downsample=conv4_downsample
        )
    else:
        widths = NARROW_WIDTHS if name.endswith("resnet12-512") else WIDTHS
        model = ResNet12(image_shape, similarity=similarity, widths=widths, drop_rate=drop_rate, generator=generator)
    return apply_weights(model, weights)


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__ = ["BACKBONES", "WEIGHTS", "Conv4", "ResNet12", "Similarity", "build_backbone", "parameter_count", "resolve_similarity"]

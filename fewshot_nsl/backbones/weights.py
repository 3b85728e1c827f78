"""How a plain backbone's convolution weights are trained: ``real``, ``binary`` or ``random-frozen``.

These are the two controls of Colombo & Gao (2020), who ask how much of a trained network's
power lives in its structure rather than its weight values:

``binary``: weights restricted to {0, 1}, a learned connectivity pattern. Each convolution keeps
a latent real score ``s`` (initialised as PyTorch initialises the weight, so about half the
connections start on) and computes with ``b = 1[s > 0]`` in training and evaluation alike. The
gradient is straight-through (Bengio et al. 2013), as in BinaryConnect (Courbariaux et al. 2015):
``b`` is treated as the hard sigmoid ``(clamp(s, -1, 1) + 1) / 2``, slope 1/2 on ``|s| <= 1`` and
0 outside, so a score far past the threshold stops moving. Straight-through rather than a relaxed
Bernoulli, because then the network computed in training is exactly the {0,1} network that is
evaluated (no temperature to anneal, no sampling noise, no generator to carry). No learned scale
per output channel: every convolution in these backbones is followed by BatchNorm, whose affine
transform already is one, so a scale would be redundant. It is implemented as a
``torch.nn.utils.parametrize`` parametrisation, so ``conv.weight`` reads the {0,1} kernel and the
latent score is ``conv.parametrizations.weight.original``.

``random-frozen``: the convolution weights stay at their seeded random initialisation; only
BatchNorm's affine parameters (and a learner's own head, if any) train.

Both apply to every convolution of a plain backbone (Conv-4, ResNet-12 with its 1x1 shortcuts);
NSL layers keep real weights, which ``check_weights`` enforces.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from fewshot_nsl.errors import UserError

WEIGHTS = ("real", "binary", "random-frozen")


class StraightThroughBinary(nn.Module):
    """Latent scores → {0, 1} weights in forward; the hard sigmoid's gradient in backward."""

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        hard = (scores > 0).to(scores.dtype)
        surrogate = (scores.clamp(-1.0, 1.0) + 1.0) / 2.0
        return hard + (surrogate - surrogate.detach())  # value: exactly ``hard``; gradient: the surrogate's


def check_weights(weights: str, nsl: bool) -> None:
    """Refuse an unknown option, or a non-real option on an NSL backbone, with a one-line error."""
    if weights not in WEIGHTS:
        raise UserError(f"unknown --weights {weights!r}; choose one of {', '.join(WEIGHTS)}")
    if weights != "real" and nsl:
        raise UserError(f"--weights {weights} applies to plain backbones (conv4, resnet12); NSL layers keep real weights")


def convolutions(backbone: nn.Module) -> list[nn.Conv2d]:
    return [module for module in backbone.modules() if isinstance(module, nn.Conv2d)]


def apply_weights(backbone: nn.Module, weights: str) -> nn.Module:
    """Make every convolution of ``backbone`` binary or frozen (in place); ``real`` leaves it as built."""
    check_weights(weights, nsl=False)
    for conv in convolutions(backbone):
        if weights == "binary":
            parametrize.register_parametrization(conv, "weight", StraightThroughBinary())
        elif weights == "random-frozen":
            conv.weight.requires_grad_(False)
    return backbone

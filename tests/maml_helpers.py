"""Helpers shared by the MAML tests: seeded weights and episodes, tiny learners, meta-gradients."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from fewshot_nsl.backbones import build_backbone
from fewshot_nsl.episodes.episode import Episode
from fewshot_nsl.learners.base import FewShotLearner
from fewshot_nsl.learners.maml import MAML
from fewshot_nsl.nsl import DynamicNSLConv2d, StaticNSLConv2d

F64 = torch.float64


def redraw_(module: nn.Module, generator: torch.Generator) -> nn.Module:
    """Redraw every conv/linear (NSL included) weight and bias uniformly in ±1/sqrt(fan_in) from ``generator``."""
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, (nn.Linear, nn.Conv2d, StaticNSLConv2d, DynamicNSLConv2d)):
                bound = 1 / math.sqrt(layer.weight[0].numel())
                for p in (layer.weight, layer.bias):
                    if p is not None:
                        p.copy_(torch.empty(p.shape, dtype=p.dtype).uniform_(-bound, bound, generator=generator))
    return module


def make_episode(
    generator: torch.Generator,
    ways: int,
    shots: int,
    queries: int,
    image_shape: tuple[int, int, int],
    dtype: torch.dtype = F64,
) -> Episode:
    """Random images; labels class-major as ``materialise`` produces them."""
    labels = torch.arange(ways)
    return Episode(
        support_images=torch.randn(ways * shots, *image_shape, generator=generator, dtype=dtype),
        support_labels=labels.repeat_interleave(shots),
        query_images=torch.randn(ways * queries, *image_shape, generator=generator, dtype=dtype),
        query_labels=labels.repeat_interleave(queries),
        ways=ways,
    )


class TinyBackbone(nn.Module):
    """tanh(Linear) on flattened (B, 1, 2, 2) images: small enough for finite differences."""

    def __init__(self, features: int = 3):
        super().__init__()
        self.layer = nn.Linear(4, features, dtype=F64)
        self.out_features = features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.layer(images.flatten(1)))


TINY_IMAGE = (1, 2, 2)


def tiny_learner(generator: torch.Generator, **settings) -> MAML:
    """TinyBackbone MAML; the zero head unless ``head`` says otherwise (any ways per episode)."""
    backbone = redraw_(TinyBackbone(), generator)
    settings.setdefault("head", "zero")
    if settings["head"] == "learned":
        settings = {"ways": 2, "generator": generator, **settings}
    return MAML(backbone, **settings)


def conv4(generator: torch.Generator, image_size: int = 16, width: int = 8) -> nn.Module:
    """The project's Conv-4 on 1-channel images, weights drawn from ``generator``."""
    return redraw_(build_backbone("conv4", (1, image_size, image_size), width=width), generator)


def meta_gradient(learner: MAML, episodes: list[Episode]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Meta-loss and its gradient w.r.t. every trainable learner parameter."""
    names, params = zip(*((n, p) for n, p in learner.named_parameters() if p.requires_grad))
    loss = learner.batch_loss(episodes).loss
    return loss.detach(), dict(zip(names, torch.autograd.grad(loss, params)))


def assert_gradients_close(actual: dict, expected: dict, rtol: float, atol: float) -> None:
    assert actual.keys() == expected.keys()
    for name in actual:
        torch.testing.assert_close(actual[name], expected[name], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def meta_train(learner: FewShotLearner, batches: Iterable[list[Episode]], lr: float) -> list[float]:
    """Adam on ``batch_loss`` over the given meta-batches; returns the meta-loss of each step.

    Shared with the real-data (Omniglot) check, which feeds sampled episodes.
    """
    optimiser = torch.optim.Adam(learner.parameters(), lr=lr)
    learner.train()
    losses = []
    for episodes in batches:
        loss = learner.batch_loss(episodes).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    return losses


def evaluate(learner: FewShotLearner, episodes: Iterable[Episode]) -> float:
    """Mean query accuracy in eval mode under ``no_grad`` (how the evaluator runs)."""
    learner.eval()
    with torch.no_grad():
        return learner.batch_loss(list(episodes)).accuracy



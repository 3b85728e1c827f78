"""Embedding-cached evaluation gives exactly the per-episode accuracies, and only for learners that allow it."""

from __future__ import annotations

import pytest
import torch

from fewshot_nsl.backbones import build_backbone
from fewshot_nsl.backbones.similarity import Similarity
from fewshot_nsl.data.dataset import ImageClassSet
from fewshot_nsl.engine.evaluator import evaluate_learner
from fewshot_nsl.episodes.manifest import ManifestSpec, draw
from fewshot_nsl.learners import MAML, ProtoNet
from fewshot_nsl.runtime import seeded


def image_set(classes: int = 12, per_class: int = 20) -> ImageClassSet:
    generator = torch.Generator().manual_seed(5)
    images = torch.randint(0, 256, (classes * per_class, 1, 28, 28), generator=generator, dtype=torch.uint8)
    labels = torch.arange(classes).repeat_interleave(per_class)
    return ImageClassSet(images, labels, tuple(f"c{c}" for c in range(classes)), (0.5,), (0.25,), "random")


def trained_batchnorm(learner: torch.nn.Module, data: ImageClassSet) -> torch.nn.Module:
    """A few train-mode passes so that BatchNorm's running statistics are not the identity."""
    learner.train()
    with torch.no_grad():
        for start in range(0, 120, 40):
            learner.backbone(data.to_float(data.images[start : start + 40]))
    return learner


@pytest.mark.parametrize("similarity", [Similarity(), Similarity("dynamic", hidden=8)], ids=lambda s: s.label)
def test_cached_embeddings_give_the_per_episode_accuracies(similarity: Similarity) -> None:
    data = image_set()
    manifest = draw(ManifestSpec("random", "none", "test", 5, 1, 3, 40), data)
    name = "conv4" if similarity.kind == "conv" else "nsl-conv4"
    with seeded(0):
        learner = trained_batchnorm(ProtoNet(build_backbone(name, (1, 28, 28), similarity, width=16)), data)
    calls = count_fits(learner)
    cpu = torch.device("cpu")
    cached_summary, cached = evaluate_learner(learner, data, manifest, cpu, progress=False)
    assert len(calls) == 0  # the cached path ran: embeddings scored, no episode fitted
    per_episode_summary, per_episode = evaluate_learner(learner, data, manifest, cpu, progress=False, per_episode=True)
    assert len(calls) == len(manifest) == 40
    assert cached == per_episode
    assert cached_summary == per_episode_summary
    assert 0.0 < cached_summary.mean < 1.0  # a real mix of right and wrong answers, not a degenerate case


def count_fits(learner) -> list[int]:
    """A list that grows by one at every ``learner.fit`` call (an instance attribute: nothing global is patched)."""
    calls: list[int] = []
    original_fit = learner.fit

    def counted_fit(*args):
        calls.append(1)
        return original_fit(*args)

    learner.fit = counted_fit
    return calls


def test_adapting_learners_stay_per_episode() -> None:
    data = image_set()
    manifest = draw(ManifestSpec("random", "none", "test", 5, 1, 2, 3), data)
    with seeded(0):
        learner = MAML(build_backbone("conv4", (1, 28, 28), width=8), ways=5)
    calls = count_fits(learner)
    evaluate_learner(learner, data, manifest, torch.device("cpu"), progress=False)
    assert len(calls) == 3

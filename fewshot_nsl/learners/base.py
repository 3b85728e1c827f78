"""The two-phase learner interface every method implements.

A learner is given a support set (``fit``), then scores queries
(``forward``). Trainer and evaluator use nothing else, so any method that
implements these plugs in. Learners see tensors only: never a dataset name.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn
import torch.nn.functional as F

from fewshot_nsl.episodes.episode import Episode


@dataclass(frozen=True)
class BatchResult:
    """Mean query loss (differentiable), accuracy, and how many predictions the accuracy is over
    (so results of the parts of a batch combine into the batch's)."""

    loss: torch.Tensor
    accuracy: float
    scored: int


class FewShotLearner(nn.Module, abc.ABC):
    """Base class: ``fit(support)`` then ``forward(query) -> logits``."""

    # Whether ``fit`` updates the backbone's parameters (MAML's inner loop).
    # Such a learner must meet its parameters as trained: static NSL layers are
    # then not folded for evaluation, since the inner loop adapts M itself.
    adapts_backbone: bool = False

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    @abc.abstractmethod
    def fit(self, support_images: torch.Tensor, support_labels: torch.Tensor, ways: int) -> "FewShotLearner":
        """Absorb a support set (labels ``0..ways-1``); returns ``self``."""

    @abc.abstractmethod
    def forward(self, query_images: torch.Tensor) -> torch.Tensor:
        """Logits (Q, ways) for queries, given the last ``fit``."""

    def episode_logits(self, episode: Episode) -> torch.Tensor:
        """Query logits of one episode in training; learners may fuse the two phases."""
        return self.fit(episode.support_images, episode.support_labels, episode.ways)(episode.query_images)

    def batch_loss(self, episodes: Sequence[Episode]) -> BatchResult:
        """Mean cross-entropy over a meta-batch of episodes.

        The default scores episode by episode; learners with a faster joint
        form (e.g. vectorised MAML) override it.
        """
        logits = [self.episode_logits(episode) for episode in episodes]
        return summarise(logits, [episode.query_labels for episode in episodes])

    def backward_parts(self, episodes: Sequence[Episode]) -> list[Sequence[Episode]]:
        """The parts ``backward_batch`` backpropagates one after another, each graph freed before
        the next is built: the whole meta-batch (one graph) unless a learner bounds memory otherwise."""
        return [episodes]

    def backward_batch(
        self,
        episodes: Sequence[Episode],
        objective: Callable[[Sequence[Episode]], BatchResult] | None = None,
        unsynced: Callable[[], AbstractContextManager] = nullcontext,
    ) -> BatchResult:
        """Accumulate the gradient of ``batch_loss`` into ``.grad``; the returned loss is detached.

        What the trainer calls. The meta-batch is split by ``backward_parts``; each part's mean
        loss, weighted by its share of the episodes, is backpropagated at once. ``objective``
        computes a part's result (``batch_loss`` by default); under torchrun it is a
        ``DistributedDataParallel`` wrapper of ``batch_loss``, and every part but the last runs
        inside ``unsynced`` (DDP's ``no_sync``), so the gradient is averaged over ranks once, in
        the last part's backward, as gradient accumulation with DDP is meant to be done.
        """
        objective = objective or self.batch_loss
        parts = self.backward_parts(episodes)
        losses, correct, scored = [], 0, 0
        for index, part in enumerate(parts):
            with unsynced() if index < len(parts) - 1 else nullcontext():
                result = objective(part)
                share = len(part) / len(episodes)
                (result.loss * share).backward()
            losses.append(result.loss.detach() * share)
            correct += round(result.accuracy * result.scored)
            scored += result.scored
        return BatchResult(torch.stack(losses).sum(), correct / scored, scored)

    def set_iteration(self, iteration: int) -> None:
        """Training progress (meta-iterations done), for learners whose recipe anneals with it."""


class EmbeddingLearner(FewShotLearner):
    """A learner whose backbone embeds every image on its own in eval mode (no adaptation, BatchNorm
    with running statistics), so the evaluator may embed each test image once and score every episode
    from the cached embeddings (``score_embedded``) instead of re-embedding per episode."""

    @abc.abstractmethod
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images to (B, D) embeddings."""

    @abc.abstractmethod
    def score_embedded(
        self, support: torch.Tensor, support_labels: torch.Tensor, ways: int, queries: torch.Tensor
    ) -> torch.Tensor:
        """Query logits (Q, ways) from support and query embeddings."""


def summarise(logits: Sequence[torch.Tensor], labels: Sequence[torch.Tensor]) -> BatchResult:
    """Mean loss over episodes and accuracy over all their queries."""
    loss = torch.stack([F.cross_entropy(lg, lb) for lg, lb in zip(logits, labels)]).mean()
    correct = sum(int((lg.argmax(-1) == lb).sum()) for lg, lb in zip(logits, labels))
    scored = sum(lb.numel() for lb in labels)
    return BatchResult(loss, correct / scored, scored)

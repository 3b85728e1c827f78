"""Prototypical Networks (Snell et al. 2017).

A class is represented by the mean embedding of its support images; a query
is scored by negative squared Euclidean distance to each prototype (or by a
scaled cosine similarity).
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from fewshot_nsl.config import DISTANCES
from fewshot_nsl.episodes.episode import Episode
from fewshot_nsl.learners.base import EmbeddingLearner


def class_means(embeddings: torch.Tensor, labels: torch.Tensor, ways: int) -> torch.Tensor:
    """Mean embedding per label (ways, D); every label must occur."""
    sums = torch.zeros(ways, embeddings.shape[1], dtype=embeddings.dtype, device=embeddings.device)
    sums.index_add_(0, labels, embeddings)
    counts = torch.bincount(labels, minlength=ways).clamp_min(1).to(embeddings.dtype)
    return sums / counts.unsqueeze(1)


class ProtoNet(EmbeddingLearner):
    def __init__(self, backbone: nn.Module, distance: str = "euclidean", cosine_scale: float = 10.0):
        super().__init__(backbone)
        if distance not in DISTANCES:
            raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
        self.distance = distance
        # Cosine logits lie in [-1, 1]; a learned temperature lets softmax sharpen.
        self.scale = nn.Parameter(torch.tensor(cosine_scale)) if distance == "cosine" else None
        self.prototypes: torch.Tensor | None = None

    def fit(self, support_images: torch.Tensor, support_labels: torch.Tensor, ways: int) -> "ProtoNet":
        self.prototypes = class_means(self.embed(support_images), support_labels, ways)
        return self

    def forward(self, query_images: torch.Tensor) -> torch.Tensor:
        if self.prototypes is None:
            raise RuntimeError("call fit(support) before scoring queries")
        return self._logits(self.embed(query_images), self.prototypes)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)

    def score_embedded(
        self, support: torch.Tensor, support_labels: torch.Tensor, ways: int, queries: torch.Tensor
    ) -> torch.Tensor:
        return self._logits(queries, class_means(support, support_labels, ways))

    def _logits(self, queries: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
        if self.distance == "cosine":
            return self.scale * F.normalize(queries, dim=-1) @ F.normalize(prototypes, dim=-1).T
        return -torch.cdist(queries, prototypes).pow(2)

    def episode_logits(self, episode: Episode) -> torch.Tensor:
        """Embeds support and query in one backbone pass.

        One pass is faster and is what the reference implementation does, so
        training-mode BatchNorm sees support and query together.
        """
        n_support = episode.support_images.shape[0]
        embeddings = self.backbone(torch.cat([episode.support_images, episode.query_images]))
        prototypes = class_means(embeddings[:n_support], episode.support_labels, episode.ways)
        return self._logits(embeddings[n_support:], prototypes)

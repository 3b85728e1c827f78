"""Episodes: the index form (what a manifest stores) and the tensor form (what a learner sees)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from fewshot_nsl.data.dataset import ImageClassSet


@dataclass(frozen=True)
class EpisodeIndices:
    """Which images make one N-way K-shot Q-query task.

    ``classes[i]`` is the dataset class that plays episode label ``i``;
    ``support[i]`` / ``query[i]`` are positions inside that class's member
    list (see ``ImageClassSet.members``). Positions rather than global image
    indices keep manifests small (uint8 for Omniglot) and readable.
    """

    classes: torch.Tensor  # int64 (N,)
    support: torch.Tensor  # int64 (N, K)
    query: torch.Tensor  # int64 (N, Q)

    @property
    def ways(self) -> int:
        return self.classes.numel()

    @property
    def shots(self) -> int:
        return self.support.shape[1]

    @property
    def queries(self) -> int:
        return self.query.shape[1]


@dataclass(frozen=True)
class Episode:
    """A task as tensors. Learners see only this: never the dataset behind it.

    Images are float (already standardised); labels are ``0..ways-1``,
    support ordered class-major (all shots of label 0 first).
    """

    support_images: torch.Tensor
    support_labels: torch.Tensor
    query_images: torch.Tensor
    query_labels: torch.Tensor
    ways: int

    def to(self, device: torch.device | str, memory_format: torch.memory_format = torch.contiguous_format) -> "Episode":
        return Episode(
            self.support_images.to(device, memory_format=memory_format, non_blocking=True),
            self.support_labels.to(device, non_blocking=True),
            self.query_images.to(device, memory_format=memory_format, non_blocking=True),
            self.query_labels.to(device, non_blocking=True),
            self.ways,
        )


def image_indices(dataset: ImageClassSet, indices: EpisodeIndices) -> tuple[torch.Tensor, torch.Tensor]:
    """Dataset positions of an episode's support and query images, class-major."""
    members = [dataset.members(int(c)) for c in indices.classes]
    support = torch.stack([m[s] for m, s in zip(members, indices.support)]).reshape(-1)
    query = torch.stack([m[q] for m, q in zip(members, indices.query)]).reshape(-1)
    return support, query


def materialise(
    dataset: ImageClassSet,
    indices: EpisodeIndices,
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Episode:
    """Gather the images an ``EpisodeIndices`` names and convert them to float.

    ``augment`` (training only) transforms the episode's uint8 images, support
    and query in one call, before the conversion.
    """
    support_idx, query_idx = image_indices(dataset, indices)
    images = dataset.images[torch.cat([support_idx, query_idx])]
    if augment is not None:
        images = augment(images)
    images = dataset.to_float(images)
    labels = torch.arange(indices.ways)
    return Episode(
        support_images=images[: support_idx.numel()],
        support_labels=labels.repeat_interleave(indices.shots),
        query_images=images[support_idx.numel() :],
        query_labels=labels.repeat_interleave(indices.queries),
        ways=indices.ways,
    )

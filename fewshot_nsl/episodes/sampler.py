"""Seeded N-way K-shot Q-query episode sampling from any ``ImageClassSet``."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from fewshot_nsl.data.augment import Augmentation
from fewshot_nsl.data.dataset import ImageClassSet
from fewshot_nsl.episodes.episode import Episode, EpisodeIndices, materialise
from fewshot_nsl.errors import UserError


def check_task_fits(dataset: ImageClassSet, ways: int, shots: int, queries: int, option_prefix: str = "") -> None:
    """Refuse a task shape the split cannot supply, before any sampling.

    ``option_prefix`` names the flags to change (``"val-"``: ``--val-ways``...).
    """
    for name, value, low in (("ways", ways, 2), ("shots", shots, 1), ("queries", queries, 1)):
        if not isinstance(value, int) or value < low:
            raise UserError(f"--{option_prefix}{name} must be an integer >= {low}, got {value!r}")
    if ways > dataset.num_classes:
        raise UserError(
            f"{ways}-way episodes need {ways} classes but {dataset.name} has {dataset.num_classes}; "
            f"lower --{option_prefix}ways"
        )
    sizes = dataset.class_sizes()
    eligible = int((sizes >= shots + queries).sum())
    if eligible < ways:
        lower = f"--{option_prefix}shots/--{option_prefix}queries"
        raise UserError(
            f"{shots} shots + {queries} queries need {shots + queries} images per class, but only {eligible} "
            f"classes of {dataset.name} have that many (smallest class: {int(sizes.min())}); lower {lower}"
        )


class EpisodeSampler:
    """Draws episodes with a named, seeded ``torch.Generator``.

    Classes are chosen uniformly among those with at least ``shots+queries``
    images; within a class, support and query images are drawn without
    replacement, so they never share an image. The order of ``classes`` is
    random, which is the random remapping of dataset labels to ``0..N-1``.
    """

    def __init__(
        self,
        dataset: ImageClassSet,
        ways: int,
        shots: int,
        queries: int,
        generator: torch.Generator,
        augmentation: Augmentation | None = None,
        augmentation_generator: torch.Generator | None = None,
    ):
        check_task_fits(dataset, ways, shots, queries)
        if (augmentation is None) != (augmentation_generator is None):
            raise ValueError("augmentation needs its own torch.Generator (augmentation_generator), and only then")
        self.dataset = dataset
        self.ways, self.shots, self.queries = ways, shots, queries
        self.generator = generator
        self.augmentation = augmentation
        self.augmentation_generator = augmentation_generator
        self._sizes = dataset.class_sizes()
        self._eligible = torch.nonzero(self._sizes >= shots + queries).flatten()

    def sample_indices(self) -> EpisodeIndices:
        pick = torch.randperm(self._eligible.numel(), generator=self.generator)[: self.ways]
        classes = self._eligible[pick]
        per_class = self.shots + self.queries
        positions = torch.stack(
            [torch.randperm(int(self._sizes[c]), generator=self.generator)[:per_class] for c in classes]
        )
        return EpisodeIndices(classes=classes, support=positions[:, : self.shots], query=positions[:, self.shots :])

    def sample(self) -> Episode:
        """The next episode, augmented if the sampler has an augmentation (its draws come from its own
        generator, so the episodes' classes and images are the same with or without it)."""
        indices = self.sample_indices()
        if self.augmentation is None:
            return materialise(self.dataset, indices)
        augmentation, generator = self.augmentation, self.augmentation_generator
        return materialise(self.dataset, indices, lambda images: augmentation(images, generator))

    def __iter__(self) -> Iterator[Episode]:
        while True:
            yield self.sample()

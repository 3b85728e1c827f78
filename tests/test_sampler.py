"""Episode sampler: shapes, disjointness, label ranges, determinism, clear errors."""

import pytest
import torch

from fewshot_nsl.data.dataset import ImageClassSet
from fewshot_nsl.episodes.sampler import EpisodeSampler
from fewshot_nsl.errors import UserError


def synthetic_set(classes: int = 12, per_class: int = 10, uneven: bool = False) -> ImageClassSet:
    """Every image carries its own index in pixel (0, 0) so tests can trace it back."""
    sizes = [per_class - (c % 3 if uneven else 0) for c in range(classes)]
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(sizes)])
    images = torch.zeros(len(labels), 1, 4, 4, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(len(labels)) % 256
    images[:, 0, 0, 1] = torch.arange(len(labels)) // 256
    return ImageClassSet(images, labels, tuple(f"c{c}" for c in range(classes)), (0.0,), (1.0,), "synthetic")


def image_ids(images: torch.Tensor) -> torch.Tensor:
    raw = (images * 255).round().long()
    return raw[:, 0, 0, 0] + 256 * raw[:, 0, 0, 1]


def sampler(dataset, ways=5, shots=2, queries=3, seed=0):
    return EpisodeSampler(dataset, ways, shots, queries, torch.Generator().manual_seed(seed))


def test_shapes_and_labels():
    episode = sampler(synthetic_set()).sample()
    assert episode.support_images.shape == (10, 1, 4, 4)
    assert episode.query_images.shape == (15, 1, 4, 4)
    assert episode.support_labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert sorted(set(episode.query_labels.tolist())) == [0, 1, 2, 3, 4]
    assert episode.support_images.dtype == torch.float32


def test_support_and_query_disjoint_and_labels_consistent():
    dataset = synthetic_set(uneven=True)
    draw = sampler(dataset, ways=6, shots=3, queries=4)
    for _ in range(50):
        indices = draw.sample_indices()
        episode = draw.sample()
        support, query = image_ids(episode.support_images), image_ids(episode.query_images)
        assert not set(support.tolist()) & set(query.tolist())
        assert len(set(support.tolist())) == support.numel()
        # each episode label maps to exactly one dataset class, for support and query alike
        for label in range(6):
            classes = dataset.labels[torch.cat([support[episode.support_labels == label], query[episode.query_labels == label]])]
            assert classes.unique().numel() == 1
        assert indices.classes.unique().numel() == 6


def test_labels_are_a_random_permutation_of_classes():
    draw = sampler(synthetic_set(classes=5), ways=5)
    orders = {tuple(draw.sample_indices().classes.tolist()) for _ in range(20)}
    assert len(orders) > 1  # the same 5 classes appear under different labels


def test_deterministic_per_seed():
    dataset = synthetic_set()
    a = [sampler(dataset, seed=7).sample_indices() for _ in range(1)] + [sampler(dataset, seed=7).sample_indices()]
    assert torch.equal(a[0].classes, a[1].classes) and torch.equal(a[0].support, a[1].support)
    b = sampler(dataset, seed=8).sample_indices()
    assert not (torch.equal(a[0].classes, b.classes) and torch.equal(a[0].support, b.support))


def test_uneven_classes_only_eligible_ones_used():
    dataset = synthetic_set(classes=9, per_class=10, uneven=True)  # sizes 10, 9, 8 repeating
    draw = sampler(dataset, ways=3, shots=5, queries=5)  # needs 10 images: only classes 0, 3, 6
    for _ in range(10):
        assert set(draw.sample_indices().classes.tolist()) == {0, 3, 6}


@pytest.mark.parametrize(
    "ways, shots, queries, message",
    [(13, 1, 1, "lower --ways"), (5, 8, 3, "lower --shots/--queries"), (1, 1, 1, "--ways must be"), (5, 0, 1, "--shots must be")],
)
def test_impossible_requests_fail_clearly(ways, shots, queries, message):
    with pytest.raises(UserError, match=message):
        sampler(synthetic_set(), ways, shots, queries)

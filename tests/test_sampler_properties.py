"""Property tests (hypothesis) of the episode sampler over arbitrary class-size layouts and task shapes.

Every valid request yields well-formed, disjoint episodes that depend only on the seed; every
invalid one raises the documented ``UserError``.
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fewshot_nsl.data.dataset import ImageClassSet
from fewshot_nsl.episodes.sampler import EpisodeSampler
from fewshot_nsl.errors import UserError

PROPERTY_SETTINGS = settings(max_examples=60, deadline=None, derandomize=True)  # the same examples on every run


def dataset_of(sizes: list[int]) -> ImageClassSet:
    """Each image stores its global index in pixels (0,0) and (0,1), so episodes can be traced back."""
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(sizes)])
    images = torch.zeros(len(labels), 1, 2, 2, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(len(labels)) % 256
    images[:, 0, 0, 1] = torch.arange(len(labels)) // 256
    return ImageClassSet(images, labels, tuple(f"c{c}" for c in range(len(sizes))), (0.0,), (1.0,), "property")


def traced(images: torch.Tensor) -> list[int]:
    raw = (images * 255).round().long()
    return (raw[:, 0, 0, 0] + 256 * raw[:, 0, 0, 1]).tolist()


@st.composite
def valid_requests(draw):
    sizes = draw(st.lists(st.integers(1, 12), min_size=2, max_size=15))
    shots = draw(st.integers(1, 5))
    queries = draw(st.integers(1, 5))
    eligible = sum(size >= shots + queries for size in sizes)
    if eligible < 2:
        sizes = sizes + [shots + queries] * (2 - eligible)
        eligible = 2
    ways = draw(st.integers(2, eligible))
    return sizes, ways, shots, queries, draw(st.integers(0, 2**31 - 1))


@PROPERTY_SETTINGS
@given(valid_requests())
def test_valid_requests_give_disjoint_well_formed_seeded_episodes(request) -> None:
    sizes, ways, shots, queries, seed = request
    data = dataset_of(sizes)
    first = EpisodeSampler(data, ways, shots, queries, torch.Generator().manual_seed(seed))
    again = EpisodeSampler(data, ways, shots, queries, torch.Generator().manual_seed(seed))
    for _ in range(3):
        episode, repeat = first.sample(), again.sample()
        assert torch.equal(episode.support_images, repeat.support_images)
        assert torch.equal(episode.query_images, repeat.query_images)
        assert episode.support_labels.tolist() == [c for c in range(ways) for _ in range(shots)]
        assert sorted(episode.query_labels.tolist()) == [c for c in range(ways) for _ in range(queries)]
        support, query = traced(episode.support_images), traced(episode.query_images)
        assert len(set(support)) == len(support) and len(set(query)) == len(query)
        assert not set(support) & set(query)
        # every image of episode label c comes from one dataset class, different for every c
        owner = {index: int(data.labels[index]) for index in support + query}
        classes = {label: {owner[i] for i, l in zip(support + query, episode.support_labels.tolist() + episode.query_labels.tolist()) if l == label} for label in range(ways)}
        assert all(len(c) == 1 for c in classes.values())
        assert len({next(iter(c)) for c in classes.values()}) == ways
        assert all(sizes[next(iter(c))] >= shots + queries for c in classes.values())


@PROPERTY_SETTINGS
@given(st.lists(st.integers(1, 8), min_size=2, max_size=10), st.integers(-2, 12), st.integers(-1, 6), st.integers(-1, 6))
def test_invalid_requests_raise_the_documented_error(sizes, ways, shots, queries) -> None:
    data = dataset_of(sizes)
    eligible = sum(size >= shots + queries for size in sizes)
    valid = ways >= 2 and shots >= 1 and queries >= 1 and ways <= len(sizes) and eligible >= ways
    if valid:
        EpisodeSampler(data, ways, shots, queries, torch.Generator().manual_seed(0)).sample()
        return
    try:
        EpisodeSampler(data, ways, shots, queries, torch.Generator().manual_seed(0))
    except UserError as error:
        message = str(error)
        assert any(hint in message for hint in ("must be an integer >=", "lower --ways", "lower --shots/--queries")), message
    else:
        raise AssertionError(f"{ways}-way {shots}-shot {queries}-query on sizes {sizes} was accepted")

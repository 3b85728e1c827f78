"""ImageClassSet invariants and joining splits (train + val for final models)."""

from __future__ import annotations

import pytest
import torch

from fewshot_nsl.data.dataset import ImageClassSet, union


def _split(name: str, classes: int, per_class: int, shape=(1, 4, 4), mean=(0.5,)) -> ImageClassSet:
    labels = torch.arange(classes).repeat_interleave(per_class)
    images = (labels.view(-1, 1, 1, 1) + torch.zeros(1, *shape, dtype=torch.int64)).to(torch.uint8)
    return ImageClassSet(images, labels, tuple(f"{name}{i}" for i in range(classes)), mean, (0.25,), f"toy/{name}")


def test_union_keeps_every_class_apart():
    train, val = _split("t", 3, 2), _split("v", 2, 4)
    joined = union(train, val)
    assert joined.num_classes == 5 and joined.class_names == ("t0", "t1", "t2", "v0", "v1")
    assert joined.class_sizes().tolist() == [2, 2, 2, 4, 4]
    # val class 1 keeps its own images (pixel value = its original label)
    assert joined.images[joined.members(4)].unique().tolist() == [1]
    assert joined.name == "toy/t+v" and joined.fingerprint() != train.fingerprint()


def test_union_refuses_mismatched_splits():
    with pytest.raises(ValueError, match="different image shape or normalisation"):
        union(_split("t", 2, 2), _split("v", 2, 2, shape=(1, 5, 5)))
    with pytest.raises(ValueError, match="different image shape or normalisation"):
        union(_split("t", 2, 2), _split("v", 2, 2, mean=(0.4,)))

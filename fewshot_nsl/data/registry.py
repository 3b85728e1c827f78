"""Dataset names → readers, and each dataset's standard evaluation protocol.

``--dataset`` is ``omniglot``, ``miniimagenet``, or a path to an image folder
(``<folder>/<split>/<class>/<image>``, or ``<folder>/<class>/<image>`` split by
class with ``--split-ratios``: protocol ``classes-...``, see ``class_split``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from fewshot_nsl.data.class_split import ClassSplit
from fewshot_nsl.data.dataset import ImageClassSet
from fewshot_nsl.data.image_folder import load_image_folder
from fewshot_nsl.data.miniimagenet import load_miniimagenet
from fewshot_nsl.data.omniglot import PROTOCOL_SPLITS, load_omniglot
from fewshot_nsl.data.roots import cache_root, data_root
from fewshot_nsl.errors import UserError


@dataclass(frozen=True)
class DatasetSpec:
    """Defaults a user expects per dataset: protocol, image size, evaluation task."""

    protocols: tuple[str, ...]
    image_size: int
    eval_ways: int
    eval_queries: int
    eval_episodes: int


DATASETS: dict[str, DatasetSpec] = {
    "omniglot": DatasetSpec(protocols=tuple(PROTOCOL_SPLITS), image_size=28, eval_ways=5, eval_queries=15, eval_episodes=1000),
    "miniimagenet": DatasetSpec(protocols=("ravi",), image_size=84, eval_ways=5, eval_queries=15, eval_episodes=600),
}
FOLDER_SPEC = DatasetSpec(protocols=("folder",), image_size=84, eval_ways=5, eval_queries=15, eval_episodes=600)


def dataset_spec(dataset: str) -> DatasetSpec:
    if dataset in DATASETS:
        return DATASETS[dataset]
    if os.sep in dataset or Path(dataset).is_dir():
        return FOLDER_SPEC
    raise UserError(f"unknown dataset {dataset!r}; use {', '.join(DATASETS)} or a path to an image folder")


def resolve_protocol(dataset: str, protocol: str | None) -> str:
    """The protocol name, defaulting to the dataset's first (Omniglot: vinyals)."""
    spec = dataset_spec(dataset)
    if protocol is None:
        return spec.protocols[0]
    if protocol in spec.protocols or (spec is FOLDER_SPEC and ClassSplit.from_protocol(protocol) is not None):
        return protocol
    hint = " (or a class split: --split-ratios)" if spec is FOLDER_SPEC else ""
    raise UserError(f"{dataset} has no protocol {protocol!r}; choose one of {', '.join(spec.protocols)}{hint}")


def load_split(
    dataset: str,
    split: str,
    protocol: str | None = None,
    root: str | os.PathLike | None = None,
    image_size: int | None = None,
) -> ImageClassSet:
    """Load one split as uint8 tensors (decoded once, then served from the cache)."""
    spec = dataset_spec(dataset)
    protocol = resolve_protocol(dataset, protocol)
    size = spec.image_size if image_size is None else image_size
    if size < 1:
        raise UserError(f"image size must be >= 1, got {size}; set --image-size (or image_size in the config) to 1 or more")
    if dataset == "omniglot":
        return load_omniglot(data_root(root), protocol, split, cache_root(), size)
    if dataset == "miniimagenet":
        return load_miniimagenet(data_root(root), split, cache_root(), size)
    return load_image_folder(Path(dataset).expanduser(), split, cache_root(), size, ClassSplit.from_protocol(protocol))

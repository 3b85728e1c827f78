"""Fixed, versioned evaluation episodes.

A manifest lists, for every episode, which classes play labels 0..N-1 and
which member positions of those classes are support and query. It records
the fingerprint of the split it was drawn from (``ImageClassSet.fingerprint``)
and a content hash, so an evaluation names exactly what it ran on and a
manifest is refused on a split it does not belong to.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from fewshot_nsl.data.dataset import ImageClassSet
from fewshot_nsl.data.registry import DATASETS
from fewshot_nsl.episodes.episode import EpisodeIndices
from fewshot_nsl.episodes.sampler import EpisodeSampler
from fewshot_nsl.errors import UserError

EPISODES_ENV = "FEWSHOT_NSL_EPISODES"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ManifestSpec:
    """What a manifest contains; ``seed`` seeds the generator that drew it."""

    dataset: str
    protocol: str
    split: str
    ways: int
    shots: int
    queries: int
    episodes: int
    seed: int = 0
    version: int = FORMAT_VERSION

    @property
    def name(self) -> str:
        return (
            f"{self.dataset}-{self.protocol}-{self.split}-{self.ways}w{self.shots}s{self.queries}q"
            f"-{self.episodes}e-v{self.version}"
        )


STANDARD_SHOTS = (1, 5)
OMNIGLOT_EXTRA_WAYS = 20  # Omniglot papers report 20-way tasks besides the registry's 5-way
# FEAT and most recent papers evaluate on 10,000 Mini-ImageNet episodes besides the classic 600: a
# 95% CI of about ±0.2 separates 1-point differences that 600 episodes (about ±0.8) cannot.
MINIIMAGENET_EXTRA_EPISODES = 10000


def _standard_specs() -> tuple[ManifestSpec, ...]:
    """The standard test tasks (committed under ``episodes/``): each dataset's evaluation protocol as
    ``data.registry`` defines it (ways, queries, episodes) at 1 and 5 shots, plus the tasks papers
    report besides it. The order is part of what ``fewshot-nsl episodes`` lists and makes."""
    omniglot, mini = DATASETS["omniglot"], DATASETS["miniimagenet"]
    return tuple(
        ManifestSpec("omniglot", protocol, "test", ways, shots, omniglot.eval_queries, omniglot.eval_episodes)
        for protocol in omniglot.protocols
        for ways in (omniglot.eval_ways, OMNIGLOT_EXTRA_WAYS)
        for shots in STANDARD_SHOTS
    ) + tuple(
        ManifestSpec("miniimagenet", protocol, "test", mini.eval_ways, shots, mini.eval_queries, episodes)
        for protocol in mini.protocols
        for episodes in (mini.eval_episodes, MINIIMAGENET_EXTRA_EPISODES)
        for shots in STANDARD_SHOTS
    )


STANDARD_SPECS = _standard_specs()


@dataclass(frozen=True)
class Manifest:
    spec: ManifestSpec
    fingerprint: str
    classes: torch.Tensor  # (E, N)
    support: torch.Tensor  # (E, N, K)
    query: torch.Tensor  # (E, N, Q)

    def __len__(self) -> int:
        return self.classes.shape[0]

    def episode(self, index: int) -> EpisodeIndices:
        return EpisodeIndices(self.classes[index], self.support[index], self.query[index])

    def content_hash(self) -> str:
        digest = hashlib.sha256(json.dumps([asdict(self.spec), self.fingerprint], sort_keys=True).encode())
        for array in (self.classes, self.support, self.query):
            digest.update(array.to(torch.int64).contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]

    def check_dataset(self, dataset: ImageClassSet) -> None:
        """Refuse a split this manifest was not drawn from."""
        if dataset.fingerprint() != self.fingerprint:
            raise _wrong_split(self.spec.name, self.fingerprint, dataset)

    def save(self, path: Path) -> None:
        def compact(array: torch.Tensor) -> np.ndarray:
            return array.numpy().astype(np.uint8 if int(array.max()) < 256 else np.uint16)

        meta = json.dumps({"spec": asdict(self.spec), "fingerprint": self.fingerprint, "hash": self.content_hash()})
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez_compressed(
            tmp, meta=np.array(meta), classes=compact(self.classes), support=compact(self.support), query=compact(self.query)
        )
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> "Manifest":
        """Read a manifest and check that its content still matches its recorded hash."""
        try:
            with np.load(path, allow_pickle=False) as archive:
                meta = json.loads(str(archive["meta"]))
                arrays = [torch.from_numpy(archive[k].astype(np.int64)) for k in ("classes", "support", "query")]
        except (OSError, KeyError, ValueError) as error:
            raise UserError(f"{path} is not a readable episode manifest ({error})") from None
        manifest = cls(ManifestSpec(**meta["spec"]), meta["fingerprint"], *arrays)
        if manifest.content_hash() != meta["hash"]:
            raise UserError(f"{path} does not match its recorded hash: it was altered; regenerate it with `fewshot-nsl episodes make`")
        return manifest


def _wrong_split(name: str, fingerprint: str, dataset: ImageClassSet) -> UserError:
    return UserError(
        f"episode manifest {name} was made for a split with fingerprint {fingerprint}, but {dataset.name} has "
        f"{dataset.fingerprint()}; use the data it was made for or run `fewshot-nsl episodes make`"
    )


def draw(spec: ManifestSpec, dataset: ImageClassSet) -> Manifest:
    """Draw ``spec.episodes`` episodes with a generator seeded by ``spec.seed``."""
    generator = torch.Generator().manual_seed(spec.seed)
    sampler = EpisodeSampler(dataset, spec.ways, spec.shots, spec.queries, generator)
    drawn = [sampler.sample_indices() for _ in range(spec.episodes)]
    return Manifest(
        spec,
        dataset.fingerprint(),
        torch.stack([e.classes for e in drawn]),
        torch.stack([e.support for e in drawn]),
        torch.stack([e.query for e in drawn]),
    )


def episodes_dir() -> Path:
    """``$FEWSHOT_NSL_EPISODES``, else the ``episodes/`` folder of the source tree."""
    if os.environ.get(EPISODES_ENV):
        return Path(os.environ[EPISODES_ENV])
    return Path(__file__).resolve().parents[2] / "episodes"


def manifest_path(spec: ManifestSpec, folder: Path | None = None) -> Path:
    return (folder or episodes_dir()) / f"{spec.name}.npz"


# Manifests of more episodes are committed as a pin - spec, split fingerprint and content hash -
# and redrawn (seeded, about a second) when used: their indices would be megabytes in the repository.
PIN_ABOVE_EPISODES = 1000


def pin_path(spec: ManifestSpec, folder: Path | None = None) -> Path:
    return (folder or episodes_dir()) / f"{spec.name}.pin.json"


def save_standard(manifest: Manifest, folder: Path | None = None) -> Path:
    """Commit form of a standard manifest: the indices, or above ``PIN_ABOVE_EPISODES`` episodes a pin."""
    if len(manifest) <= PIN_ABOVE_EPISODES:
        path = manifest_path(manifest.spec, folder)
        manifest.save(path)
        return path
    path = pin_path(manifest.spec, folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    pin = {"spec": asdict(manifest.spec), "fingerprint": manifest.fingerprint, "hash": manifest.content_hash()}
    path.write_text(json.dumps(pin, indent=2) + "\n")
    return path


def stored_manifest(spec: ManifestSpec, dataset: ImageClassSet, folder: Path | None = None) -> Manifest | None:
    """The committed manifest of ``spec`` (from its file, or redrawn and checked against its pin); ``None`` if none.

    A pinned manifest whose redraw differs from the pin is refused: the split or the sampler changed,
    and these would no longer be the episodes every earlier result was measured on.
    """
    path = manifest_path(spec, folder)
    if path.exists():
        return Manifest.load(path)
    pin = pin_path(spec, folder)
    if not pin.exists():
        return None
    recorded = json.loads(pin.read_text())
    if dataset.fingerprint() != recorded["fingerprint"]:
        raise _wrong_split(spec.name, recorded["fingerprint"], dataset)
    manifest = draw(spec, dataset)
    if manifest.content_hash() != recorded["hash"]:
        raise UserError(
            f"redrawing {spec.name} no longer gives the pinned episodes (#{recorded['hash']}): the split or the "
            f"episode sampler changed; use the data and version it was made for, or re-pin with `fewshot-nsl episodes make`"
        )
    return manifest

"""The one in-memory form every dataset reader produces.

Images are decoded and resized once into a uint8 tensor, so sampling an
episode is pure indexing: no file access and no image decoding per episode.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class ImageClassSet:
    """Labelled images of one split (e.g. Omniglot Vinyals ``test``).

    Attributes:
        images: uint8 tensor (N, C, H, W).
        labels: int64 tensor (N,), values in ``0..len(class_names)-1``.
        class_names: stable names of the classes; their order defines the
            class indices used by episode manifests.
        mean, std: per-channel statistics used to turn uint8 into float input.
        name: human-readable identity, e.g. ``omniglot/vinyals/test``.
    """

    images: torch.Tensor
    labels: torch.Tensor
    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str
    _members: tuple[torch.Tensor, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"{self.name}: images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"{self.name}: {self.labels.numel()} labels for {self.images.shape[0]} images")
        if len(self.mean) != self.images.shape[1] or len(self.std) != self.images.shape[1]:
            raise ValueError(f"{self.name}: mean/std need one value per channel ({self.images.shape[1]})")
        order = torch.argsort(self.labels, stable=True)
        counts = torch.bincount(self.labels, minlength=len(self.class_names)).tolist()
        if len(counts) != len(self.class_names):
            raise ValueError(f"{self.name}: labels exceed the {len(self.class_names)} class names")
        object.__setattr__(self, "_members", tuple(torch.split(order, counts)))

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def class_sizes(self) -> torch.Tensor:
        """Number of images of every class, int64 (num_classes,)."""
        return torch.tensor([len(m) for m in self._members], dtype=torch.int64)

    def members(self, class_index: int) -> torch.Tensor:
        """Indices into ``images`` of one class, in a stable order."""
        return self._members[class_index]

    def fingerprint(self) -> str:
        """Hash of the class names, class sizes and image shape.

        Episode manifests record it, so a manifest made for one split is
        refused on another split or on a differently prepared copy.
        """
        digest = hashlib.sha256()
        digest.update(repr(self.image_shape).encode())
        for name, size in zip(self.class_names, self.class_sizes().tolist()):
            digest.update(f"{name}:{size}\n".encode())
        return digest.hexdigest()[:16]

    def to_float(self, images: torch.Tensor) -> torch.Tensor:
        """Scale uint8 images to [0, 1] and standardise them per channel."""
        return standardise(images, self.mean, self.std)


def standardise(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 (B, C, H, W) → float: scaled to [0, 1], minus ``mean``, divided by ``std`` per channel."""
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (images.float().div_(255.0) - mean_t) / std_t


def union(first: ImageClassSet, second: ImageClassSet) -> ImageClassSet:
    """Both splits' classes as one set (e.g. Omniglot train + val, as Snell et
    al. train their final models on all 1200 background characters).

    The second split's labels follow the first's; both must share image shape
    and normalisation, since one network will see them.
    """
    if first.image_shape != second.image_shape or first.mean != second.mean or first.std != second.std:
        raise ValueError(f"cannot join {first.name} and {second.name}: different image shape or normalisation")
    return ImageClassSet(
        torch.cat([first.images, second.images]),
        torch.cat([first.labels, second.labels + first.num_classes]),
        first.class_names + second.class_names,
        first.mean,
        first.std,
        f"{first.name}+{second.name.rsplit('/', 1)[-1]}",
    )

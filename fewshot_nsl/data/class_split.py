"""A seeded split of one folder of class folders into train / val / test classes.

For a dataset that is ``<root>/<class>/<image>`` with no split folders
(``--split-ratios 0.64,0.16,0.20``, the proportions of Ravi & Larochelle's
Mini-ImageNet split): the sorted class names are permuted by a
``torch.Generator`` seeded with the split seed, and cut into consecutive runs
of ``round(ratio * classes)`` classes (test takes the rest). The split is a
*protocol* (``classes-0.64-0.16-0.2-seed0``), so manifests, run configs and
leaderboard rows name it, and two seeds or ratios are never confused.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from fewshot_nsl.errors import UserError

SPLITS = ("train", "val", "test")
MIN_RATIO = 1e-3
RATIO_DIGITS = ".12g"  # protocol names keep 12 significant digits: the ratios read back still sum to 1
_PROTOCOL = re.compile(r"classes-([0-9.]+)-([0-9.]+)-([0-9.]+)-seed([0-9]+)")


@dataclass(frozen=True)
class ClassSplit:
    ratios: tuple[float, float, float]
    seed: int = 0

    def __post_init__(self) -> None:
        if len(self.ratios) != 3 or any(not math.isfinite(r) or r <= 0 for r in self.ratios):
            raise UserError(f"--split-ratios needs three positive fractions (train,val,test), got {self.ratios}")
        if min(self.ratios) < MIN_RATIO:
            raise UserError(f"--split-ratios: each fraction must be at least {MIN_RATIO}, got {self.ratios}")
        if abs(sum(self.ratios) - 1) > 1e-6:
            raise UserError(f"--split-ratios must sum to 1, got {'+'.join(f'{r:g}' for r in self.ratios)} = {sum(self.ratios):g}")
        if self.seed < 0:
            raise UserError(f"--split-seed must be >= 0, got {self.seed}")

    @classmethod
    def parse(cls, ratios: str, seed: int = 0) -> "ClassSplit":
        """From the CLI/YAML text ``"0.64,0.16,0.20"``."""
        try:
            values = tuple(float(part) for part in ratios.split(","))
        except ValueError:
            raise UserError(f"--split-ratios takes three comma-separated fractions like 0.64,0.16,0.20, got {ratios!r}") from None
        return cls(values, seed)  # type: ignore[arg-type]

    @property
    def protocol(self) -> str:
        return "classes-" + "-".join(format(r, RATIO_DIGITS) for r in self.ratios) + f"-seed{self.seed}"

    @classmethod
    def from_protocol(cls, protocol: str) -> "ClassSplit | None":
        """The split a protocol name stands for, or None for any other protocol."""
        match = _PROTOCOL.fullmatch(protocol)
        if match is None:
            return None
        return cls(tuple(float(match.group(i)) for i in (1, 2, 3)), int(match.group(4)))  # type: ignore[arg-type]

    def classes(self, class_names: tuple[str, ...] | list[str], split: str) -> tuple[str, ...]:
        """The (sorted) class names that fall in ``split``."""
        if split not in SPLITS:
            raise UserError(f"a class split has no {split!r} split; it has {', '.join(SPLITS)}")
        names = sorted(class_names)
        counts = [round(r * len(names)) for r in self.ratios[:2]]
        counts.append(len(names) - sum(counts))
        if min(counts) < 1:
            raise UserError(
                f"--split-ratios {','.join(f'{r:g}' for r in self.ratios)} of {len(names)} classes leaves "
                f"{dict(zip(SPLITS, counts))}; every split needs a class: add classes or change the ratios"
            )
        order = torch.randperm(len(names), generator=torch.Generator().manual_seed(self.seed)).tolist()
        start = sum(counts[: SPLITS.index(split)])
        return tuple(sorted(names[i] for i in order[start : start + counts[SPLITS.index(split)]]))

"""Seeds derived from other seeds, and blocks run on a seeded default generator.

Seeding two generators with ``seed`` and ``seed + 1`` ties one run's second stream to the next
run's first; a hash of a tag and the numbers gives seeds unrelated to each other and to any plain
seed. Code that takes no generator (layer constructors, torchvision's transforms) draws from
torch's default generator: :func:`seeded` forks and seeds it for one block. Both live in the
lowest layer (``data``) because data (surrogate samples) and the layers above it (model
construction, per-rank seeds) need them, and one definition keeps them alike.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator

import torch


def hashed_seed(tag: str, *numbers: int) -> int:
    """63 bits of SHA-256 of ``tag`` and ``numbers`` joined by spaces (a valid ``manual_seed``).

    ``tag`` names the stream (e.g. ``"exemplar"``), so two purposes with the same numbers get
    unrelated seeds; the text hashed is part of the recorded results' definition and never changes.
    """
    digest = hashlib.sha256(" ".join([tag, *map(str, numbers)]).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block (model construction, a surrogate sample) with the default CPU generator seeded by ``seed``.

    PyTorch's layer constructors draw their initial weights from the default
    generator; forking it keeps initialisation reproducible from ``seed``
    without leaving the global state changed afterwards. Only the CPU
    generator is seeded: ``torch.manual_seed`` would also reseed every CUDA
    device's generator, which ``fork_rng(devices=[])`` does not restore.
    """
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield

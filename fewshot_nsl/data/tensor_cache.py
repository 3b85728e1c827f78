"""Decode once, keep the uint8 tensors on disk, keyed by what they were made from."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import torch


def source_key(paths: Iterable[Path], *settings: object) -> str:
    """A short key that changes when a source file or a setting changes.

    Uses each file's absolute path, size and modification time (one ``stat``
    per file, no content read, no ``resolve``), so checking the key of tens
    of thousands of JPEGs costs a fraction of a second.
    """
    digest = hashlib.sha256()
    for path in paths:
        stat = os.stat(path)
        digest.update(f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    digest.update(repr(settings).encode())
    return digest.hexdigest()[:16]


def cached(cache_dir: Path, name: str, key: str, build: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Load ``name-key.pt`` from ``cache_dir`` or build and store it atomically."""
    path = cache_dir / f"{name}-{key}.pt"
    if path.exists():
        return torch.load(path, weights_only=True)
    tensors = build()
    cache_dir.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".tmp")
    os.close(handle)
    torch.save(tensors, tmp)
    os.replace(tmp, path)
    return tensors

"""Proving a load came from the decode cache without patching the decoder."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path


@contextlib.contextmanager
def undecodable_keeping_stat(files: Iterable[Path]) -> Iterator[None]:
    """Overwrite ``files`` with zero bytes of the same size and restore their modification times.

    The cache key (path, size, mtime) is unchanged, so a cached load still hits, while any
    decode would fail on the garbage. The original bytes and times come back on exit.
    """
    saved = []
    for path in files:
        stat = path.stat()
        saved.append((path, path.read_bytes(), (stat.st_atime_ns, stat.st_mtime_ns)))
        path.write_bytes(bytes(stat.st_size))
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    try:
        yield
    finally:
        for path, data, times in saved:
            path.write_bytes(data)
            os.utime(path, ns=times)

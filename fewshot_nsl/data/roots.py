"""Where data and caches live: an explicit path, else an environment variable, else a per-user default."""

from __future__ import annotations

import os
from pathlib import Path

DATA_ENV = "FEWSHOT_NSL_DATA"
CACHE_ENV = "FEWSHOT_NSL_CACHE"


def data_root(explicit: str | os.PathLike | None = None) -> Path:
    """The folder holding ``omniglot/``, ``miniimagenet/`` ...

    ``--data-root`` wins, then ``$FEWSHOT_NSL_DATA``, then
    ``~/.cache/fewshot-nsl/data`` (where ``fewshot-nsl data prepare`` downloads).
    """
    if explicit:
        return Path(explicit).expanduser()
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV]).expanduser()
    return Path.home() / ".cache" / "fewshot-nsl" / "data"


def cache_root() -> Path:
    """Writable folder for decoded uint8 tensors (the data root may be read-only)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path.home() / ".cache" / "fewshot-nsl" / "cache"

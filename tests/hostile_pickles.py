"""Objects whose pickles misbehave, for the tests that prove the project never runs or trusts them."""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path


class RunsCode:
    """Unpickling this would run ``touch <marker>``: a test passes only if the marker never appears."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class WritesMeanwhile:
    """Pickling this first has ``write`` save another file to the same path: a second writer in the middle
    of the first one's write, as when two processes save one file at once."""

    def __init__(self, write):
        self.write = write

    def __reduce__(self):
        self.write()
        return (OrderedDict, ())  # an empty mapping, which weights-only loading accepts


class DiskFull:
    """Pickling this fails the way a full disk does, midway through a write."""

    def __reduce__(self):
        raise OSError(28, "No space left on device")

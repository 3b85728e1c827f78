"""Seeds derived from other seeds, for generators that must not share a stream.

Seeding two generators with ``seed`` and ``seed + 1`` ties one run's second stream to the next
run's first; a hash of a tag and the numbers gives seeds unrelated to each other and to any plain
seed. It lives in the lowest layer (``data``) because data (surrogate samples) and the engine
(per-rank seeds) both derive seeds this way, and one definition keeps their derivations alike.
"""

from __future__ import annotations

import hashlib


def hashed_seed(tag: str, *numbers: int) -> int:
    """63 bits of SHA-256 of ``tag`` and ``numbers`` joined by spaces (a valid ``manual_seed``).

    ``tag`` names the stream (e.g. ``"exemplar"``), so two purposes with the same numbers get
    unrelated seeds; the text hashed is part of the recorded results' definition and never changes.
    """
    digest = hashlib.sha256(" ".join([tag, *map(str, numbers)]).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)

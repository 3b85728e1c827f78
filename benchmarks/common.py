"""Helpers shared by the benchmark scripts: timing, result files, real-data location."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]


def data_root() -> str:
    """``$FEWSHOT_NSL_DATA`` or the ``shared/data`` folder beside the checkout."""
    return os.environ.get("FEWSHOT_NSL_DATA") or str(REPO.parent / "shared" / "data")


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def machine() -> dict[str, object]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def provenance(allow_dirty: bool) -> dict[str, object]:
    """The commit results come from; a tree with uncommitted changes is refused unless allowed (and then marked)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD")
    dirty = bool(git("status", "--porcelain", "--untracked-files=no", "--", "fewshot_nsl", "benchmarks", "configs"))
    if dirty and not allow_dirty:
        sys.exit("refusing to write results from uncommitted code: commit first, or pass --allow-dirty (marks the results)")
    return {"commit": commit, "dirty": dirty}


def add_allow_dirty(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--allow-dirty", action="store_true", help="write results from uncommitted code (marked so)")


def write_results(name: str, payload: dict, markdown: str, origin: dict[str, object]) -> None:
    """The JSON and markdown results of a script, both naming the commit (and a dirty tree) they come from."""
    RESULTS.mkdir(exist_ok=True)
    stamp = f"Code: commit {origin['commit']}" + (" with UNCOMMITTED changes (--allow-dirty)" if origin["dirty"] else "")
    markdown = markdown.rstrip("\n") + f"\n\n{stamp}.\n"
    (RESULTS / f"{name}.json").write_text(json.dumps({"provenance": origin, **payload}, indent=2))
    (RESULTS / f"{name}.md").write_text(markdown)
    print(markdown)

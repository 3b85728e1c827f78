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


# Fixed thresholds make glibc map every large tensor when allocated and return it when freed (they also
# switch off its adaptive thresholds), so a process's peak RSS counts what it holds at once.
GLIBC_RETURNS_FREED_MEMORY = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
PEAK_RSS_RESETTABLE = Path("/proc/self/clear_refs").exists()  # Linux


def memory_probe_environment() -> dict[str, str]:
    """Environment for a child process that measures memory: freed memory is returned at once.
    GLIBC_TUNABLES (the fast setting that keeps freed buffers) would override the thresholds."""
    return {**{k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}, **GLIBC_RETURNS_FREED_MEMORY}


def proc_status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_rss_growth(work: Callable[[], object]) -> int:
    """Bytes by which ``work`` raises this process's peak resident memory above its current one
    (run it once before, untimed, so one-off allocations are not counted)."""
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before = proc_status_bytes("VmRSS")
    work()
    return proc_status_bytes("VmHWM") - before


def last_command(command: str) -> str:
    """The opening of a results file's description: the command that wrote it, and on what."""
    return f"Last command: `{command}`, on {os.cpu_count()} CPU cores (torch {torch.__version__})."


def provenance(allow_dirty: bool, repo: Path = REPO) -> dict[str, object]:
    """The commit results come from; a tree with uncommitted changes is refused unless allowed (and then marked)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD")
    dirty = bool(git("status", "--porcelain", "--untracked-files=no", "--", "fewshot_nsl", "benchmarks", "configs"))
    if dirty and not allow_dirty:
        sys.exit("refusing to write results from uncommitted code: commit first, or pass --allow-dirty (marks the results)")
    return {"commit": commit, "dirty": dirty}


def add_allow_dirty(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--allow-dirty", action="store_true", help="write results from uncommitted code (marked so)")


def write_results(
    name: str, payload: dict, markdown: str, origin: dict[str, object], results_dir: Path = RESULTS
) -> None:
    """The JSON and markdown results of a script, both naming the commit (and a dirty tree) they come from."""
    results_dir.mkdir(exist_ok=True)
    stamp = f"Code: commit {origin['commit']}" + (" with UNCOMMITTED changes (--allow-dirty)" if origin["dirty"] else "")
    markdown = markdown.rstrip("\n") + f"\n\n{stamp}.\n"
    (results_dir / f"{name}.json").write_text(json.dumps({"provenance": origin, **payload}, indent=2))
    (results_dir / f"{name}.md").write_text(markdown)
    print(markdown)

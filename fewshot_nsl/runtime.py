"""Device choice, seeded construction and the fast CPU settings.

``seeded`` is defined in ``fewshot_nsl.data.seeds`` (surrogate samples need it below this module)
and offered here with the other run-time helpers.

On CPU, glibc's malloc returns large buffers to the OS after every episode
and pays page faults to get them back; telling it to keep them (two glibc
tunables, read only at process start) made a Conv-4 episode 1.82-1.98x
faster on this project's 2-core machine, and 2.60-3.76x together with channels_last
tensors (``benchmarks/results/throughput.md``, written by
``benchmarks/throughput.py``). The CLI therefore re-executes itself once
with ``GLIBC_TUNABLES`` set, unless ``FEWSHOT_NSL_NO_REEXEC`` is set or the
variable is already there.
"""

from __future__ import annotations

import os
import sys

import torch

from fewshot_nsl.data.seeds import seeded
from fewshot_nsl.errors import UserError

FAST_MALLOC = "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=8589934592"
NO_REEXEC_ENV = "FEWSHOT_NSL_NO_REEXEC"


def reexec_with_fast_malloc(argv: list[str]) -> None:
    """Replace this process by the same command with ``GLIBC_TUNABLES`` set (Linux/glibc only)."""
    if not sys.platform.startswith("linux") or os.environ.get(NO_REEXEC_ENV) or "GLIBC_TUNABLES" in os.environ:
        return
    env = dict(os.environ, GLIBC_TUNABLES=FAST_MALLOC, **{NO_REEXEC_ENV: "1"})
    os.execve(sys.executable, [sys.executable, "-m", "fewshot_nsl", *argv], env)


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without one is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    index = name.removeprefix("cuda:")
    if name not in ("cpu", "cuda") and not (name.startswith("cuda:") and index.isdigit()):
        raise UserError(f"--device must be auto, cpu or cuda (or cuda:N, N a GPU number), got {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA device is available; use --device cpu or auto")
    if index.isdigit() and int(index) >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return torch.device(name)


def memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


__all__ = ["FAST_MALLOC", "NO_REEXEC_ENV", "memory_format", "reexec_with_fast_malloc", "resolve_device", "seeded"]

"""Which code produced a result: the commit of each training session and of the evaluation.

A leaderboard row is ``clean`` only when every session that trained the run
and the evaluation itself ran from a commit with no uncommitted changes to the
package, so the commit names the code. ``dirty`` means some of that code was
never committed; ``unverified`` means a session's state is unknown (no git,
or a row/run written before training commits were recorded).
"""

from __future__ import annotations

import functools
import subprocess
from collections.abc import Sequence
from pathlib import Path

import fewshot_nsl

CLEAN, DIRTY, UNVERIFIED = "clean", "dirty", "unverified"
DIRTY_MARK = "+dirty"  # suffix of a session's commit when its tree had uncommitted changes


@functools.cache
def source_state() -> tuple[str, bool | None]:
    """The commit of the code that runs, and whether the package has uncommitted changes (None: unknown).

    Read once per process (at its first result: training's start, or the evaluation): a commit
    made while a long run goes on changes the checkout, not the code the process has loaded.
    """

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=Path(fewshot_nsl.__file__).parent, capture_output=True, text=True, timeout=5)

    try:
        commit, status = git("rev-parse", "--short", "HEAD"), git("status", "--porcelain", "--untracked-files=no", ".")
    except (OSError, subprocess.TimeoutExpired):
        return "unknown", None
    if commit.returncode != 0:
        return "unknown", None
    return commit.stdout.strip(), bool(status.stdout.strip())


def session_label() -> str:
    """``<commit>``, ``<commit>+dirty`` or ``unknown`` for the running code."""
    commit, dirty = source_state()
    if dirty is None:
        return "unknown"
    return commit + (DIRTY_MARK if dirty else "")


def provenance(eval_dirty: object, train_sessions: Sequence[str] | None) -> str:
    """``clean``, ``dirty`` or ``unverified`` for a row (see the module docstring).

    ``eval_dirty`` is the row's ``git_dirty`` (True/False, or missing/NaN for
    rows written before it existed); ``train_sessions`` the run's recorded
    training sessions (``session_label`` values), or None when not recorded.
    """
    sessions = list(train_sessions or ())
    if eval_dirty is True or any(s.endswith(DIRTY_MARK) for s in sessions):
        return DIRTY
    if eval_dirty is not False or not sessions or "unknown" in sessions:
        return UNVERIFIED
    return CLEAN

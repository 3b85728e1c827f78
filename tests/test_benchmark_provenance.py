"""Benchmark scripts write results only from committed code, and say which commit."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from benchmarks import common


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A throwaway repository with the folders provenance() watches."""
    git(tmp_path, "init", "-q")
    git(tmp_path, "config", "user.email", "ci@example.invalid")
    git(tmp_path, "config", "user.name", "ci")
    for folder in ("fewshot_nsl", "benchmarks", "configs"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "code.py").write_text("x = 1\n")
    git(tmp_path, "add", ".")
    git(tmp_path, "commit", "-qm", "start")
    return tmp_path


def test_a_clean_tree_names_its_commit(repo: Path) -> None:
    assert common.provenance(False, repo) == {"commit": git(repo, "rev-parse", "--short", "HEAD"), "dirty": False}


@pytest.mark.parametrize("folder", ["fewshot_nsl", "benchmarks", "configs"])
def test_uncommitted_code_is_refused_unless_allowed_and_then_marked(repo: Path, folder: str) -> None:
    (repo / folder / "code.py").write_text("x = 2\n")
    with pytest.raises(SystemExit, match="refusing to write results from uncommitted code"):
        common.provenance(False, repo)
    assert common.provenance(True, repo)["dirty"] is True


def test_results_files_carry_the_commit(tmp_path: Path) -> None:
    results = tmp_path / "results"
    common.write_results("probe", {"value": 1}, "# Probe\n", {"commit": "abc1234", "dirty": True}, results_dir=results)
    assert json.loads((results / "probe.json").read_text())["provenance"] == {"commit": "abc1234", "dirty": True}
    assert (results / "probe.md").read_text().endswith("Code: commit abc1234 with UNCOMMITTED changes (--allow-dirty).\n")

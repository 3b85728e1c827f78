"""How the accuracy suites label a row's network, why a retrained run's old curve survives, and how a
rerun on other code is set beside its earlier result."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from benchmarks.accuracy import network_of, reruns, run_network
from benchmarks.nsl_rerun_spread import comparisons, what_changes


def test_rows_without_a_recorded_downsampling_read_as_max_pooling_and_other_backbones_have_none() -> None:
    rows = pd.DataFrame(
        {"backbone": ["conv4", "nsl-conv4", "conv4", "resnet12"], "conv4_downsample": [None, "stride", "maxpool", None]}
    )
    assert network_of(rows).tolist() == ["maxpool", "stride", "maxpool", "—"]
    legacy = pd.DataFrame({"backbone": ["conv4"]})  # a leaderboard from before the column existed
    assert network_of(legacy).tolist() == ["maxpool"]


def test_a_run_directory_names_its_downsampling_or_the_legacy_default(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text("method: maml\nconv4_downsample: stride\n")
    assert run_network(tmp_path) == "stride"
    (tmp_path / "config.yaml").write_text("method: maml\n")
    assert run_network(tmp_path) == "maxpool"


def test_a_rerun_on_other_code_is_paired_with_its_earlier_row_and_judged_by_the_ci_of_the_difference() -> None:
    common = {"run_dir": "runs/x/protonet-h16", "ways": 20, "episodes": 1000, "head": "—", "network": "maxpool", "seed": 0}
    rows = pd.DataFrame(
        [
            common | {"shots": 1, "train_episodes": 400, "acc": 0.80, "ci95": 0.002, "train_commits": "old", "git_commit": "e0"},
            common | {"shots": 1, "train_episodes": 3000, "acc": 0.9216, "ci95": 0.0021, "train_commits": "aaa", "git_commit": "e1"},
            common | {"shots": 5, "train_episodes": 3000, "acc": 0.9826, "ci95": 0.0007, "train_commits": None, "git_commit": "bbb"},
            # the rerun wrote its run directory elsewhere (another checkout): the run's name pairs them
            common | {"shots": 1, "train_episodes": 3000, "acc": 0.9200, "ci95": 0.0021, "train_commits": "ccc", "git_commit": "e2",
                      "run_dir": "/elsewhere/protonet-h16"},
            common | {"shots": 5, "train_episodes": 3000, "acc": 0.9800, "ci95": 0.0007, "train_commits": "ccc", "git_commit": "e2",
                      "run_dir": "/elsewhere/protonet-h16"},
        ]
    )
    latest = rows.loc[[3, 4]]
    table = reruns(rows, latest)
    body = [line for line in table if line.startswith("| protonet-h16")]
    # the 400-iteration row is another budget: not a rerun
    assert len(body) == 2
    one_shot, five_shot = body
    # 0.16 points apart with CIs of 0.21: inside sqrt(0.21² + 0.21²) = 0.30 → yes
    assert "| aaa | 92.16 ± 0.21 | ccc | 92.00 ± 0.21 | -0.16 | yes (±0.30) |" in one_shot
    # a row without training commits is named by its evaluation commit; 0.26 apart against ±0.10 → no
    assert "| bbb | 98.26 ± 0.07 | ccc | 98.00 ± 0.07 | -0.26 | no (±0.10) |" in five_shot
    assert reruns(rows.loc[[1, 2]], rows.loc[[1, 2]]) == []


def test_rerun_spread_pairs_trainings_of_one_run_and_names_what_differs() -> None:
    def training(run: str, variant: str, one_shot: float, five_shot: float) -> dict:
        return {"run": run, "variant": variant,
                "tasks": {"20w1s": {"acc": one_shot, "ci95": 0.21}, "20w5s": {"acc": five_shot, "ci95": 0.07}}}  # fmt: skip

    pairs = comparisons([
        training("h16", "kernels, 2 threads", 92.12, 98.26),
        training("h16", "PyTorch path, 1 thread", 91.59, 98.21),
        training("h16-seed1", "kernels, 2 threads", 90.00, 97.00),  # another run: never paired with h16
    ])  # fmt: skip
    assert [(p["task"], round(p["difference"], 2), p["within"]) for p in pairs] == [("20w1s", -0.53, False), ("20w5s", -0.05, True)]
    assert pairs[0]["bound"] == pytest.approx((2 * 0.21**2) ** 0.5)
    repeated = comparisons([
        training("h16", "kernels, 2 threads", 92.12, 98.26),
        training("h16", "kernels, 2 threads, again", 92.12, 98.26),
        training("h16", "kernels, 1 thread", 91.53, 98.15),
    ])  # fmt: skip
    assert [(p["first"], p["second"]) for p in repeated][::2] == [
        ("kernels, 2 threads", "kernels, 2 threads, again"), ("kernels, 2 threads", "kernels, 1 thread")
    ]  # the repeat is paired with its original only
    assert what_changes("kernels, 2 threads", "PyTorch path, 1 thread") == "implementation and threads"
    assert what_changes("kernels, 2 threads", "kernels, 1 thread") == "threads"
    assert what_changes("kernels, 2 threads", "kernels, 2 threads, again") == "nothing (same code, same threads)"

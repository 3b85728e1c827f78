"""Real training on Omniglot and the CLI round trip train → eval → leaderboard."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from fewshot_nsl.cli.main import run
from fewshot_nsl.data.roots import DATA_ENV
from fewshot_nsl.results import leaderboard
from fewshot_nsl.results.provenance import source_state
from tests.paired_runs import paired_gain

pytestmark = pytest.mark.real_data


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, real_omniglot_root: Path, real_cache_dir: Path) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(DATA_ENV, str(real_omniglot_root))
    monkeypatch.setenv("FEWSHOT_NSL_CACHE", str(real_cache_dir))
    return tmp_path


def test_short_training_learns_and_cli_round_trip(workdir: Path, capsys: pytest.CaptureFixture[str]):
    config = workdir / "short.yaml"
    config.write_text("method: protonet\nbackbone: conv4\nways: 20\nshots: 5\nqueries: 5\nval_episodes: 50\n")
    status = run(["train", "--config", str(config), "--episodes", "120", "--val-every", "60", "--seed", "3",
                  "--run-dir", "runs/p1", "--no-progress"])  # fmt: skip
    assert status == 0
    run_dir = workdir / "runs" / "p1"
    assert {"best.pt", "last.pt", "config.yaml", "metrics.csv", "train_summary.json"} <= {p.name for p in run_dir.iterdir()}
    saved = (run_dir / "config.yaml").read_text()
    assert "seed: 3" in saved and "episodes: 120" in saved and "ways: 20" in saved  # flags override the YAML
    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert set(metrics["split"]) == {"train", "val"}

    # 5-way 1-shot over 200 fixed test episodes: chance is 20%; 120 iterations of training reach > 85%.
    assert run(["eval", "--run-dir", "runs/p1", "--ways", "5", "--shots", "1", "--episodes", "200", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "5-way 1-shot: acc" in out and "(95% CI, 200 episodes)" in out
    board = leaderboard.read(workdir / "leaderboard.csv")
    assert len(board) == 1
    row = board.iloc[0]
    assert row["acc"] > 0.85, f"short training reached only {row['acc']:.3f}"
    assert (row["method"], row["backbone"], row["similarity"], row["ways"], row["shots"], row["episodes"]) == (
        "protonet", "conv4", "conv", 5, 1, 200)  # fmt: skip
    assert row["train_episodes"] == 120 and row["parameters"] > 100_000 and len(str(row["manifest_hash"])) == 16
    # provenance: the one training session and the evaluation ran this checkout's code
    commit, dirty = source_state()
    assert row["train_commits"] == commit + ("+dirty" if dirty else "") and row["git_commit"] == commit
    assert row["provenance"] == ("dirty" if dirty else "clean")
    per_episode = pd.read_csv(run_dir / "eval" / f"{row['manifest']}.csv")
    assert len(per_episode) == 200 and per_episode["acc"].mean() == pytest.approx(row["acc"], abs=1e-6)

    # the standard manifest is used by default: the protocol's ways/queries/episodes
    assert run(["eval", "--run-dir", "runs/p1", "--shots", "5", "--no-progress", "--leaderboard", "board2.csv"]) == 0
    second = pd.read_csv(workdir / "board2.csv").iloc[0]
    assert second["manifest"] == "omniglot-vinyals-test-5w5s15q-1000e-v1" and second["episodes"] == 1000
    assert run(["leaderboard", "--csv", "board2.csv", "--format", "csv"]) == 0
    assert "omniglot,vinyals,5,5,protonet,conv4" in capsys.readouterr().out


def test_bad_input_gives_one_line_errors(workdir: Path, capsys: pytest.CaptureFixture[str]):
    cases = [
        (["train", "--ways", "5000", "--run-dir", "r"], "lower --ways"),
        (["train", "--backbone", "conv4", "--similarity", "dynamic"], "needs an NSL backbone"),
        (["train", "--config", "missing.yaml"], "does not exist"),
        (["eval", "--run-dir", "nowhere"], "train into it first"),
        (["leaderboard", "--csv", "none.csv"], "evaluate a run first"),
        (["train", "--dataset", "imagenet21k"], "unknown dataset"),
        (["train", "--protocol", "lake", "--train-on-val"], "has no val split"),
        (["train", "--resume", "nowhere"], "train into it first"),
        (["train", "--resume", "nowhere", "--ways", "5"], "drop the other training flags"),
        (["train", "--method", "maml", "--head", "learned", "--meta-sgd", "--lslr"], "Meta-SGD (per entry) or MAML++ LSLR"),
        (["train", "--device", "tpu"], "--device must be auto, cpu or cuda"),
        (["train", "--backbone", "nsl-conv4", "--nsl-kernels", "false"], "applies to dynamic NSL layers only"),
    ]
    if not torch.cuda.is_available():
        cases.append((["train", "--device", "cuda"], "no CUDA device is available; use --device cpu or auto"))
    for argv, message in cases:
        assert run(argv) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err


def test_short_maml_run_on_omniglot_learns_beyond_its_untrained_start(workdir: Path):
    common = ["--method", "maml", "--ways", "5", "--shots", "1", "--queries", "1", "--meta-batch", "8", "--lr", "1e-2",
              "--val-episodes", "10", "--no-progress"]  # fmt: skip
    assert run(["train", *common, "--episodes", "60", "--val-every", "60", "--run-dir", "runs/m1"]) == 0
    # the same seeded network untrained: one meta-step of 1e-12 moves no weight visibly
    assert run(["train", *common, "--episodes", "1", "--lr", "1e-12", "--run-dir", "runs/m0"]) == 0
    for run_dir in ("runs/m1", "runs/m0"):
        assert run(["eval", "--run-dir", run_dir, "--ways", "5", "--shots", "1", "--episodes", "80", "--no-progress"]) == 0
    trained, untrained, gain = paired_gain(workdir, "runs/m1", "runs/m0")
    assert trained["method"] == "maml" and trained["episodes"] == 80
    # Untrained, the 3 test-time inner steps alone reach about 0.5 (chance 0.2); 60 meta-iterations of 8 tasks at
    # 1e-2 add about 0.1 on the same episodes: the 95% CI of the paired gain must exclude zero.
    assert gain.mean - gain.ci95 > 0, f"MAML {trained['acc']:.3f} vs untrained {untrained['acc']:.3f}: gain {gain}"


def test_train_on_val_uses_both_splits_and_keeps_the_last_checkpoint(workdir: Path, capsys: pytest.CaptureFixture[str]):
    # 1028 train + 172 val Vinyals characters x 4 rotations = 4800 classes: a 4200-way task fits only in the union
    assert run(["train", "--ways", "4200", "--shots", "1", "--queries", "1", "--episodes", "1", "--run-dir", "r"]) == 2
    err = capsys.readouterr().err
    assert "4200-way episodes need 4200 classes" in err and "has 4112" in err and "lower --ways" in err, err
    assert run(["train", "--train-on-val", "--ways", "4200", "--shots", "1", "--queries", "1", "--episodes", "1",
                "--run-dir", "runs/tv", "--no-progress"]) == 0  # fmt: skip
    metrics = pd.read_csv(workdir / "runs" / "tv" / "metrics.csv")
    assert set(metrics["split"]) == {"train"}
    assert (workdir / "runs" / "tv" / "best.pt").exists()

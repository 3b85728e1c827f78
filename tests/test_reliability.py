"""Crash-safe training: resume after SIGKILL/SIGTERM bitwise, safe loading, non-finite losses, overwrite, leaderboard locking."""

from __future__ import annotations

import multiprocessing
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from fewshot_nsl.cli.main import run
from fewshot_nsl.config import RunConfig
from fewshot_nsl.data.roots import CACHE_ENV, DATA_ENV
from fewshot_nsl.engine.checkpoint import load_checkpoint
from fewshot_nsl.engine.trainer import _best_so_far, resume, train
from fewshot_nsl.errors import UserError
from fewshot_nsl.results import leaderboard
from tests.hostile_pickles import DiskFull, RunsCode, WritesMeanwhile

REPO = Path(__file__).resolve().parents[1]
# A small ProtoNet run: narrow Conv-4, 5-way 1-shot 1-query, a checkpoint every 5 iterations.
SMALL = ["--method", "protonet", "--width", "8", "--ways", "5", "--shots", "1", "--queries", "1",
         "--episodes", "200", "--val-every", "1000", "--checkpoint-every", "5", "--no-progress"]  # fmt: skip


@pytest.fixture
def env(tmp_path: Path, real_omniglot_root: Path, real_cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(DATA_ENV, str(real_omniglot_root))
    monkeypatch.setenv(CACHE_ENV, str(real_cache_dir))
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "FEWSHOT_NSL_NO_REEXEC": "1"}


def start(env: dict, run_dir: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "fewshot_nsl", "train", *SMALL, "--run-dir", run_dir, *extra],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def wait_for_checkpoint(run_dir: Path, process: subprocess.Popen, at_least: int) -> None:
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and process.poll() is None:
        last = run_dir / "last.pt"
        if last.exists() and load_checkpoint(last)["progress"]["iteration"] >= at_least:
            return
        time.sleep(0.05)
    pytest.fail(f"no checkpoint of iteration >= {at_least} appeared (exit {process.poll()})")


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / "last.pt")["model"]


@pytest.mark.real_data
def test_killed_or_stopped_runs_resume_to_the_same_weights_bitwise(tmp_path: Path, env: dict) -> None:
    """With augmentation on, so its generator's state is proven to be saved and restored too."""
    reference = start(env, "runs/whole", "--augment")
    assert reference.wait(timeout=300) == 0, reference.stderr.read()

    killed = start(env, "runs/killed", "--augment")
    wait_for_checkpoint(tmp_path / "runs/killed", killed, 10)
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=60)
    resumed = subprocess.run([sys.executable, "-m", "fewshot_nsl", "train", "--resume", "runs/killed", "--no-progress"],
                             env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr

    stopped = start(env, "runs/stopped", "--augment")
    wait_for_checkpoint(tmp_path / "runs/stopped", stopped, 5)
    stopped.send_signal(signal.SIGTERM)
    assert stopped.wait(timeout=60) == 130
    message = stopped.stderr.read().strip()
    assert "stopped by SIGTERM" in message and "fewshot-nsl train --resume runs/stopped" in message, message
    again = subprocess.run([sys.executable, "-m", "fewshot_nsl", "train", "--resume", "runs/stopped", "--no-progress"],
                           env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert again.returncode == 0, again.stderr

    expected = final_weights(tmp_path / "runs/whole")
    for name in ("killed", "stopped"):
        got = final_weights(tmp_path / "runs" / name)
        assert got.keys() == expected.keys()
        for key in expected:
            assert torch.equal(got[key], expected[key]), f"{name}: {key} differs from the uninterrupted run"
        metrics = pd.read_csv(tmp_path / "runs" / name / "metrics.csv")
        assert list(metrics["iteration"]) == list(pd.read_csv(tmp_path / "runs/whole/metrics.csv")["iteration"])


def test_a_checkpoint_that_would_run_code_is_refused_and_runs_nothing(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("method: protonet\n")
    marker = tmp_path / "pwned"
    torch.save({"model": RunsCode(marker)}, run_dir / "best.pt")
    with pytest.raises(UserError, match="not a safe fewshot-nsl checkpoint"):
        load_checkpoint(run_dir / "best.pt")
    assert run(["eval", "--run-dir", str(run_dir), "--no-progress"]) == 2
    assert not marker.exists()


@pytest.mark.real_data
def test_a_nonfinite_loss_stops_keeping_the_last_good_checkpoint_or_is_skipped(tmp_path: Path, env: dict) -> None:
    # A learning rate of 1e30 overflows BatchNorm's variance within a few iterations.
    config = RunConfig(method="protonet", width=8, ways=5, shots=1, queries=1, episodes=12, val_every=1000,
                       checkpoint_every=1, lr=1e30, run_dir="runs/nan")  # fmt: skip
    with pytest.raises(UserError, match=r"became (nan|inf) at iteration \d+") as stopped:
        train(config, progress=False)
    failed_at = int(str(stopped.value).split("at iteration ")[1].split(";")[0])
    assert f"(iteration {failed_at - 1})" in str(stopped.value) and "--skip-nonfinite" in str(stopped.value)
    # advice that can be followed: --resume takes no --lr, so the run starts again from its config
    assert "--config runs/nan/config.yaml --lr LOWER --overwrite" in str(stopped.value) and "--resume" not in str(stopped.value)
    kept = load_checkpoint(tmp_path / "runs/nan/last.pt")
    assert kept["progress"]["iteration"] == failed_at - 1
    assert all(torch.isfinite(t).all() for t in kept["model"].values() if t.is_floating_point())

    result = train(config.updated({"run_dir": "runs/skip", "skip_nonfinite": True}), progress=False)
    assert result.iterations == 12
    assert load_checkpoint(tmp_path / "runs/skip/last.pt")["progress"]["skipped_nonfinite"] >= 12 - failed_at + 1


@pytest.mark.real_data
def test_overwrite_moves_the_old_run_aside_and_resume_refuses_finished_runs(tmp_path: Path, env: dict) -> None:
    config = RunConfig(method="protonet", width=8, ways=5, shots=1, queries=1, episodes=3, val_every=1000, run_dir="runs/o")
    train(config, progress=False)
    with pytest.raises(UserError, match="already holds a run"):
        train(config, progress=False)
    (tmp_path / "runs/o/marker.txt").write_text("old run")
    train(config.updated({"episodes": 2}), overwrite=True, progress=False)
    assert not (tmp_path / "runs/o/marker.txt").exists()
    aside = [p for p in (tmp_path / "runs").iterdir() if p.name.startswith("o.replaced-")]
    assert len(aside) == 1 and (aside[0] / "marker.txt").read_text() == "old run"
    with pytest.raises(UserError, match="finished run"):
        resume(tmp_path / "runs/o", progress=False)
    assert run(["train", "--resume", "runs/o", "--episodes", "5"]) == 2


def _append_rows(path: str, writer: int, rows: int) -> None:
    for index in range(rows):
        leaderboard.append(Path(path), {"method": "protonet", "dataset": "omniglot", "acc": 0.5, "ci95": 0.01,
                                        "run_dir": f"w{writer}-r{index}"})  # fmt: skip


def test_concurrent_appends_lose_duplicate_and_garble_no_row(tmp_path: Path) -> None:
    path = tmp_path / "board.csv"
    context = multiprocessing.get_context("spawn")
    writers = [context.Process(target=_append_rows, args=(str(path), w, 50)) for w in range(8)]
    for process in writers:
        process.start()
    for process in writers:
        process.join(timeout=300)
        assert process.exitcode == 0
    frame = pd.read_csv(path)
    expected = {f"w{w}-r{i}" for w in range(8) for i in range(50)}
    assert len(frame) == 400 and set(frame["run_dir"]) == expected
    assert (frame["acc"] == 0.5).all() and (frame["method"] == "protonet").all()


@pytest.mark.parametrize("skip_on_purpose", [False, True], ids=["fails", "skips-when-asked"])
def test_missing_real_data_fails_unless_skipping_is_asked_for(tmp_path: Path, skip_on_purpose: bool) -> None:
    env = {**os.environ, DATA_ENV: str(tmp_path / "absent"), "PYTHONPATH": str(REPO)}
    env.pop("FEWSHOT_NSL_SKIP_REAL_DATA", None)
    if skip_on_purpose:
        env["FEWSHOT_NSL_SKIP_REAL_DATA"] = "1"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
         str(REPO / "tests/test_manifest.py::test_shipped_manifests_match_real_data")],
        env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    if skip_on_purpose:
        assert done.returncode == 0 and "1 skipped" in done.stdout and "FEWSHOT_NSL_SKIP_REAL_DATA=1" in done.stdout
    else:
        assert done.returncode == 1 and "1 error" in done.stdout and "real data not found" in done.stdout


def test_a_failed_checkpoint_write_keeps_the_previous_one(tmp_path: Path) -> None:
    from fewshot_nsl.engine.checkpoint import save_atomically

    path = tmp_path / "last.pt"
    save_atomically({"model": {"w": torch.ones(2)}}, path)
    with pytest.raises(UserError, match="No space left on device.*previous last.pt is intact"):
        save_atomically({"model": {"w": torch.zeros(2)}, "extra": DiskFull()}, path)
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left behind


def test_two_writers_of_one_file_each_replace_it_whole(tmp_path: Path) -> None:
    """Each write goes through its own temporary file: a second writer in the middle of the first neither
    breaks it nor leaves a mixture; the file ends as the writer that finished last wrote it."""
    from fewshot_nsl.engine.checkpoint import save_atomically

    path = tmp_path / "last.pt"
    inner = {"model": {"w": torch.zeros(2)}}
    save_atomically({"model": {"w": torch.ones(2)}, "extra": WritesMeanwhile(lambda: save_atomically(inner, path))}, path)
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


@pytest.mark.real_data
def test_a_checkpoint_of_another_model_is_refused_naming_the_difference(tmp_path: Path, env: dict) -> None:
    config = RunConfig(method="protonet", width=8, ways=5, shots=1, queries=1, episodes=2, val_every=1000, run_dir="runs/a")
    train(config, progress=False)
    edited = (tmp_path / "runs/a/config.yaml").read_text().replace("width: 8", "width: 16")
    (tmp_path / "runs/a/config.yaml").write_text(edited)
    assert run(["eval", "--run-dir", "runs/a", "--episodes", "5", "--no-progress"]) == 2
    with pytest.raises(UserError, match="width 8 in best.pt vs 16 in config.yaml"):
        from fewshot_nsl.engine.checkpoint import load_run

        load_run(tmp_path / "runs/a")


@pytest.mark.real_data
def test_training_with_a_layer_penalty_without_gradient_runs(tmp_path: Path, env: dict) -> None:
    """The trainer backpropagates layer penalties separately; diagonal static NSL's constant zero must not break it."""
    config = RunConfig(method="protonet", backbone="nsl-conv4", similarity="static", nsl_form="diagonal", width=8, ways=5,
                       shots=1, queries=1, episodes=3, val_every=1000, run_dir="runs/diagonal")  # fmt: skip
    assert train(config, progress=False).iterations == 3


def test_a_resumed_run_beats_the_best_checkpoint_not_an_older_record(tmp_path: Path) -> None:
    """best.pt can be newer than last.pt (validated after the last checkpoint, then stopped)."""
    assert _best_so_far(tmp_path, 0.7) == 0.7  # no best.pt yet
    torch.save({"model": {}, "val_acc": 0.8}, tmp_path / "best.pt")
    assert _best_so_far(tmp_path, 0.7) == 0.8 and _best_so_far(tmp_path, 0.9) == 0.9 and _best_so_far(tmp_path, None) == 0.8
    torch.save({"model": {}, "val_acc": None}, tmp_path / "best.pt")  # trained on train + val: no validation
    assert _best_so_far(tmp_path, None) is None


def _dropblock_run(tmp_path: Path, name: str, seed: int = 0, episodes: int = 4) -> RunConfig:
    """ProtoNet with the narrowest ResNet-12 and DropBlock on a fixture folder (2 classes of 2 images)."""
    from tests.test_bad_data_input import image_folder

    root = tmp_path / "pets"
    if not root.exists():
        image_folder(root)
    return RunConfig(method="protonet", backbone="resnet12-512", drop_rate=0.1, dataset=str(root), image_size=16,
                     ways=2, shots=1, queries=1, val_ways=2, val_shots=1, val_queries=1, val_episodes=2,
                     episodes=episodes, checkpoint_every=2, seed=seed, device="cpu", run_dir=str(tmp_path / name))  # fmt: skip


def test_dropblock_training_is_a_function_of_its_seed(tmp_path: Path, cache_dir: Path) -> None:
    """DropBlock's masks come from the run's own generator: two trainings of one seed in one process give
    the same weights, torch's global generator is never drawn from, and another seed trains otherwise."""
    global_state = torch.get_rng_state()
    train(_dropblock_run(tmp_path, "first", episodes=2), progress=False)
    assert torch.equal(torch.get_rng_state(), global_state)
    train(_dropblock_run(tmp_path, "again", episodes=2), progress=False)
    train(_dropblock_run(tmp_path, "other", seed=1, episodes=2), progress=False)
    first, again, other = (final_weights(tmp_path / name) for name in ("first", "again", "other"))
    assert all(torch.equal(first[key], again[key]) for key in first)
    assert not all(torch.equal(first[key], other[key]) for key in first)
    saved = load_checkpoint(tmp_path / "first" / "last.pt")["random"]["dropblock"]
    assert not torch.equal(saved, torch.Generator().manual_seed(0).get_state())  # its masks were drawn from it


def test_a_dropblock_run_resumes_to_the_uninterrupted_weights_bitwise(tmp_path: Path, cache_dir: Path) -> None:
    """A run stopped at its checkpoint of iteration 2 (made by training 2 iterations and giving its
    config.yaml the 4 of the whole run) resumes with DropBlock's generator where it was."""
    train(_dropblock_run(tmp_path, "whole"), progress=False)
    stopped = tmp_path / "stopped"
    train(_dropblock_run(tmp_path, "stopped", episodes=2), progress=False)
    (stopped / "train_summary.json").unlink()
    config_file = stopped / "config.yaml"
    config_file.write_text(re.sub(r"(?m)^episodes: 2$", "episodes: 4", config_file.read_text()))
    resume(stopped, progress=False)
    expected, got = final_weights(tmp_path / "whole"), final_weights(stopped)
    assert all(torch.equal(got[key], expected[key]) for key in expected)


@pytest.mark.real_data
def test_the_full_static_nsl_penalty_pulls_every_entry_of_m_toward_the_identity(tmp_path: Path, env: dict) -> None:
    config = RunConfig(method="protonet", backbone="nsl-conv4", similarity="static", nsl_form="full", width=8, ways=5,
                       shots=1, queries=1, episodes=1, val_every=1000, val_episodes=5, run_dir="runs/start")  # fmt: skip
    train(config, progress=False)
    state = load_checkpoint(tmp_path / "runs/start/best.pt")
    layers = [key.removesuffix(".M") for key in state["model"] if key.endswith(".M")]
    assert len(layers) == 4
    eye = torch.eye(9)
    offset = 0.5 * (-1) ** (torch.arange(9)[:, None] + torch.arange(9))  # both signs, on and off the diagonal
    for layer in layers:  # a start far from I (at I the penalty and its gradient are zero)
        state["model"][f"{layer}.M"] = eye + offset
        state["model"][f"{layer}.weight"].zero_()  # dL/dM = w^T dL/dW': zero kernels leave M no gradient from the data
    torch.save(state, tmp_path / "runs/start/best.pt")
    train(config.updated({"init": "runs/start", "run_dir": "runs/pulled"}), progress=False)
    after = load_checkpoint(tmp_path / "runs/pulled/last.pt")["model"]
    # the penalty's gradient 2 penalty (M - I) alone: Adam's first step moves every entry by lr toward I
    for layer in layers:
        pulled = eye + offset - config.resolve().lr * offset.sign()
        torch.testing.assert_close(after[f"{layer}.M"], pulled, rtol=0, atol=1e-6, msg=lambda m: f"{layer}: {m}")

"""torchrun with two CPU processes (gloo): the same computation as one process, sharded evaluation
exactly equal to one process, rank 0 alone writing, and resume under torchrun."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fewshot_nsl.config import load_config
from fewshot_nsl.data.registry import load_split
from fewshot_nsl.data.roots import CACHE_ENV, DATA_ENV
from fewshot_nsl.data.seeds import hashed_seed
from fewshot_nsl.engine.checkpoint import LAST, load_checkpoint
from fewshot_nsl.engine.distributed import World, rank_seed, shard
from fewshot_nsl.episodes.sampler import EpisodeSampler
from fewshot_nsl.learners import build_learner
from fewshot_nsl.runtime import memory_format, seeded

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "fewshot_nsl"]


@given(st.integers(0, 500), st.integers(1, 6))
def test_shards_cover_every_episode_once_in_order(count: int, size: int) -> None:
    shards = [shard(count, World(rank, size)) for rank in range(size)]
    assert [i for part in shards for i in part] == list(range(count))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_rank_zero_samples_like_one_process_and_other_ranks_get_their_own_seeds() -> None:
    assert rank_seed(7, 0) == 7
    seeds = {rank_seed(seed, rank) for seed in range(4) for rank in range(1, 4)}
    assert len(seeds) == 12 and not seeds & set(range(4))


def test_derived_seeds_keep_the_values_recorded_runs_were_drawn_with() -> None:
    """Per-rank episode seeds and exemplar sample seeds share one derivation; their values are pinned
    (changing them would change every torchrun and exemplar result)."""
    assert rank_seed(7, 1) == hashed_seed("fewshot-nsl episodes", 7, 1) == 8484279221519983524
    assert rank_seed(0, 2) == 9219745645330059065
    assert hashed_seed("exemplar", 5, 3, 7) == 4459032391559019725


@pytest.fixture(scope="module")
def env(real_omniglot_root: Path, real_cache_dir: Path) -> dict[str, str]:
    return dict(os.environ, **{DATA_ENV: str(real_omniglot_root), CACHE_ENV: str(real_cache_dir), "OMP_NUM_THREADS": "1"})


def torchrun(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    done = subprocess.run([*TORCHRUN, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def one_process_reference(run_dir: Path, ranks: int) -> dict[str, torch.Tensor]:
    """The run's training, written out here in one process: every iteration scores each rank's
    ``meta_batch`` episodes (from that rank's generator), averages the ranks' gradients and steps once.

    On the first iteration it also checks that this averaged gradient is the gradient of the joint mean
    loss over all ``ranks * meta_batch`` episodes (one process with that meta-batch), to float tolerance.
    """
    config = load_config(run_dir / "config.yaml")
    train_set = load_split(config.dataset, "train", config.protocol, config.data_root, config.image_size)
    with seeded(config.seed):
        learner = build_learner(config, train_set.image_shape)
    layout = memory_format(bool(config.channels_last))
    learner.to(memory_format=layout)
    parameters = list(learner.parameters())
    optimizer = torch.optim.Adam(parameters, lr=config.lr)
    samplers = [
        EpisodeSampler(train_set, config.ways, config.shots, config.queries, torch.Generator().manual_seed(rank_seed(config.seed, r)))
        for r in range(ranks)
    ]
    for iteration in range(config.episodes):
        learner.train()
        learner.set_iteration(iteration)
        batches = [[sampler.sample().to("cpu", layout) for _ in range(config.meta_batch)] for sampler in samplers]
        per_rank = []
        for batch in batches:
            optimizer.zero_grad(set_to_none=True)
            learner.backward_batch(batch)
            per_rank.append([p.grad.clone() for p in parameters])
        if iteration == 0:
            optimizer.zero_grad(set_to_none=True)
            learner.backward_batch([episode for batch in batches for episode in batch])
            for parameter, *grads in zip(parameters, *per_rank):
                torch.testing.assert_close(sum(grads) / ranks, parameter.grad, rtol=1e-4, atol=1e-6)
        for parameter, *grads in zip(parameters, *per_rank):
            parameter.grad = sum(grads) / ranks
        optimizer.step()
    return {name: p.detach() for name, p in learner.named_parameters()}


@pytest.mark.real_data
@pytest.mark.parametrize(
    "recipe",
    [
        ["--method", "protonet", "--ways", "5", "--shots", "2", "--queries", "3"],
        ["--config", "configs/maml-conv4-omniglot.yaml", "--meta-batch", "2"],
        # task by task: DDP's no_sync for the first task, one reduction in the last task's backward
        ["--config", "configs/maml-conv4-omniglot.yaml", "--meta-batch", "2", "--vectorise", "false"],
    ],
    ids=["protonet", "maml", "maml-sequential"],
)
def test_two_processes_train_what_one_process_trains_with_their_episodes(
    recipe: list[str], env: dict[str, str], tmp_path: Path
) -> None:
    repo = Path(__file__).resolve().parents[1]
    recipe = [str(repo / a) if a.startswith("configs/") else a for a in recipe]
    run_dir = tmp_path / "run"
    done = torchrun(
        ["train", *recipe, "--episodes", "3", "--val-episodes", "10", "--checkpoint-every", "1", "--device", "cpu",
         "--run-dir", str(run_dir), "--no-progress"],
        env, tmp_path,
    )  # fmt: skip
    assert done.stdout.count("trained 3 iterations") == 1  # rank 0 alone reports
    assert "Grad strides do not match bucket view strides" not in done.stderr  # DDP reduces in place, no copies
    state = load_checkpoint(run_dir / LAST)
    assert state["world_size"] == 2 and len(state["random_ranks"]) == 2
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank ran: oneDNN's sums then round alike
    try:
        reference = one_process_reference(run_dir, ranks=2)
    finally:
        torch.set_num_threads(threads)
    for name, value in reference.items():
        torch.testing.assert_close(state["model"][name], value, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.real_data
def test_sharded_evaluation_equals_one_process_and_rank_zero_alone_writes(env: dict[str, str], tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    subprocess.run(
        [sys.executable, "-m", "fewshot_nsl", "train", "--ways", "5", "--shots", "1", "--queries", "3", "--episodes", "4",
         "--val-episodes", "10", "--device", "cpu", "--run-dir", str(run_dir), "--no-progress"],
        env=env, cwd=tmp_path, check=True, capture_output=True,
    )  # fmt: skip
    evaluate = ["eval", "--run-dir", str(run_dir), "--no-progress", "--shots", "1", "--episodes", "101", "--device", "cpu"]
    single = subprocess.run(
        [sys.executable, "-m", "fewshot_nsl", *evaluate, "--leaderboard", "one.csv"], env=env, cwd=tmp_path,
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    per_episode = next((run_dir / "eval").glob("*.csv"))
    one = per_episode.read_text()
    per_episode.unlink()
    shared = torchrun([*evaluate, "--leaderboard", "two.csv"], env, tmp_path)
    assert per_episode.read_text() == one
    rows = [pd.read_csv(tmp_path / name) for name in ("one.csv", "two.csv")]
    assert len(rows[1]) == 1  # one row, from rank 0
    assert rows[0][["acc", "ci95", "episodes"]].equals(rows[1][["acc", "ci95", "episodes"]])
    assert shared.stdout.strip() == single.stdout.strip()


def worker_pids(launcher: subprocess.Popen) -> dict[int, int]:
    """The ranks torchrun started, by their ``RANK`` (Linux /proc)."""
    workers = {}
    for children in Path(f"/proc/{launcher.pid}/task").glob("*/children"):
        for pid in map(int, children.read_text().split()):
            environ = dict(
                item.split("=", 1) for item in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in item
            )
            if "RANK" in environ:
                workers[int(environ["RANK"])] = pid
    return workers


def launch_until_checkpoint(args: list[str], env: dict[str, str], cwd: Path, checkpoint: Path) -> subprocess.Popen:
    """Start torchrun in the background and return once the run has written ``checkpoint``."""
    launcher = subprocess.Popen([*TORCHRUN, *args], env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not checkpoint.exists():
        assert launcher.poll() is None, launcher.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.2)
    return launcher


SHORT_RUN = ["--ways", "5", "--shots", "1", "--queries", "1", "--episodes", "400", "--checkpoint-every", "5",
             "--val-episodes", "10", "--device", "cpu", "--no-progress"]  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted(env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """The final weights of SHORT_RUN trained by two processes without a stop."""
    work = tmp_path_factory.mktemp("whole")
    torchrun(["train", *SHORT_RUN, "--run-dir", str(work / "run")], env, work)
    return load_checkpoint(work / "run" / LAST)["model"]


def assert_same_weights(run_dir: Path, expected: dict[str, torch.Tensor]) -> None:
    got = load_checkpoint(run_dir / LAST)["model"]
    for name, value in expected.items():
        assert torch.equal(got[name], value), name


@pytest.mark.real_data
def test_a_run_stopped_under_torchrun_resumes_to_the_uninterrupted_result(
    env: dict[str, str], tmp_path: Path, uninterrupted: dict[str, torch.Tensor]
) -> None:
    stopped = tmp_path / "stopped"
    launcher = launch_until_checkpoint(["train", *SHORT_RUN, "--run-dir", str(stopped)], env, tmp_path, stopped / LAST)
    launcher.send_signal(signal.SIGTERM)  # what a scheduler does; torchrun passes it on to every rank
    _, stderr = launcher.communicate(timeout=120)
    assert launcher.returncode != 0 and "--resume" in stderr, stderr[-3000:]
    assert not (stopped / "train_summary.json").exists()
    refused = subprocess.run(
        [sys.executable, "-m", "fewshot_nsl", "train", "--resume", str(stopped)], env=env, cwd=tmp_path,
        capture_output=True, text=True,
    )  # fmt: skip
    assert refused.returncode == 2 and "--nproc_per_node=2" in refused.stderr
    torchrun(["train", "--resume", str(stopped), "--no-progress"], env, tmp_path)
    assert_same_weights(stopped, uninterrupted)


@pytest.mark.real_data
def test_a_rank_that_dies_ends_the_job_with_a_message_instead_of_a_hang(env: dict[str, str], tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    launcher = launch_until_checkpoint(
        ["train", "--ways", "5", "--shots", "1", "--queries", "1", "--episodes", "100000", "--checkpoint-every", "5",
         "--device", "cpu", "--no-progress", "--run-dir", str(run_dir)],
        env, tmp_path, run_dir / LAST,
    )  # fmt: skip
    os.kill(worker_pids(launcher)[1], signal.SIGKILL)
    started = time.monotonic()
    _, stderr = launcher.communicate(timeout=120)
    assert launcher.returncode != 0
    assert time.monotonic() - started < 60
    assert "ChildFailedError" in stderr and "SIGKILL" in stderr, stderr[-3000:]
    assert load_checkpoint(run_dir / LAST)["progress"]["iteration"] >= 5  # what rank 0 had written is kept


@pytest.mark.real_data
def test_resume_if_stopped_starts_resumes_or_reports_a_finished_run(env: dict[str, str], tmp_path: Path) -> None:
    def train(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "fewshot_nsl", "train", *SHORT_RUN, "--episodes", "10", "--run-dir", "run", *extra],
            env=env, cwd=tmp_path, capture_output=True, text=True,
        )  # fmt: skip

    assert train("--resume-if-stopped").returncode == 0  # nothing there: starts
    metrics = (tmp_path / "run" / "metrics.csv").read_text()
    again = train("--resume-if-stopped")  # a restart after the run finished: reports it, trains nothing
    assert again.returncode == 0 and "trained 10 iterations" in again.stdout
    assert (tmp_path / "run" / "metrics.csv").read_text() == metrics
    for name in ("last.pt", "best.pt", "train_summary.json"):  # as if stopped before its first checkpoint
        (tmp_path / "run" / name).unlink()
    assert train("--resume-if-stopped").returncode == 0
    assert (tmp_path / "run" / "train_summary.json").exists()
    other = train("--resume-if-stopped", "--seed", "5")
    assert other.returncode == 2 and "another config" in other.stderr
    both = train("--resume-if-stopped", "--overwrite")
    assert both.returncode == 2 and "choose one" in both.stderr

"""Training and evaluation throughput of ProtoNet Conv-4 on Omniglot, on this machine.

Measures episodes/s for training (20-way and 60-way, 5-shot, 5 queries: sample,
forward, backward, Adam step) and evaluation (5-way 5-shot 15 queries,
folded network, no grad), under four settings: glibc malloc default or told
to keep its buffers (GLIBC_TUNABLES, only settable before Python starts,
hence one subprocess per measurement) × contiguous or channels_last tensors.
Settings are interleaved over rounds and the median taken; speed-ups are
ratios against the plain setting measured in the same script run.

    python benchmarks/throughput.py            # ~3 minutes on 2 cores
    python benchmarks/throughput.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import add_allow_dirty, data_root, machine, provenance, write_results  # noqa: E402
from fewshot_nsl.config import RunConfig  # noqa: E402
from fewshot_nsl.data.registry import load_split  # noqa: E402
from fewshot_nsl.episodes.sampler import EpisodeSampler  # noqa: E402
from fewshot_nsl.learners import build_learner  # noqa: E402
from fewshot_nsl.nsl import fold_static_nsl  # noqa: E402
from fewshot_nsl.runtime import FAST_MALLOC, memory_format, seeded  # noqa: E402

TASKS = {"train-20w5s5q": (20, 5, 5), "train-60w5s5q": (60, 5, 5), "eval-5w5s15q": (5, 5, 15)}


def worker(task: str, channels_last: bool, episodes: int) -> float:
    """Seconds per episode of one task in this process."""
    ways, shots, queries = TASKS[task]
    split = load_split("omniglot", "train" if task.startswith("train") else "test", "vinyals", data_root())
    with seeded(0):
        learner = build_learner(RunConfig().resolve(), split.image_shape)
    layout = memory_format(channels_last)
    learner.to(memory_format=layout)
    sampler = EpisodeSampler(split, ways, shots, queries, torch.Generator().manual_seed(0))
    if task.startswith("train"):
        optimizer = torch.optim.Adam(learner.parameters(), lr=1e-3)

        def step() -> None:
            loss = learner.batch_loss([sampler.sample().to("cpu", layout)]).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    else:
        learner = fold_static_nsl(learner).eval()

        @torch.no_grad()
        def step() -> None:
            episode = sampler.sample().to("cpu", layout)
            learner.fit(episode.support_images, episode.support_labels, episode.ways)(episode.query_images)

    for _ in range(5):
        step()
    start = time.perf_counter()
    for _ in range(episodes):
        step()
    return (time.perf_counter() - start) / episodes


def measure(task: str, fast_malloc: bool, channels_last: bool, episodes: int) -> float:
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    if fast_malloc:
        env["GLIBC_TUNABLES"] = FAST_MALLOC
    command = [sys.executable, __file__, "--worker", task, "--episodes", str(episodes)]
    command += ["--channels-last"] if channels_last else []
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["seconds_per_episode"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", choices=TASKS)
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--episodes", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    add_allow_dirty(parser)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps({"seconds_per_episode": worker(args.worker, args.channels_last, args.episodes)}))
        return
    origin = provenance(args.allow_dirty or args.quick)
    episodes, rounds = (4, 1) if args.quick else (args.episodes, args.rounds)
    settings = [(False, False), (False, True), (True, False), (True, True)]
    samples: dict[tuple[str, bool, bool], list[float]] = {}
    for _ in range(rounds):
        for task in TASKS:
            for fast, last in settings:
                samples.setdefault((task, fast, last), []).append(measure(task, fast, last, episodes))
    rows, lines = [], ["| task | malloc | layout | s/episode | episodes/s | speed-up vs default |", "|---|---|---|---|---|---|"]
    for task in TASKS:
        base = statistics.median(samples[(task, False, False)])
        for fast, last in settings:
            seconds = statistics.median(samples[(task, fast, last)])
            rows.append({"task": task, "fast_malloc": fast, "channels_last": last, "seconds_per_episode": seconds, "speedup": base / seconds})
            lines.append(f"| {task} | {'kept buffers' if fast else 'default'} | {'channels_last' if last else 'contiguous'} | {seconds:.3f} | {1 / seconds:.1f} | {base / seconds:.2f}× |")
    header = (
        "# ProtoNet Conv-4 throughput on Omniglot (CPU)\n\n"
        f"`python benchmarks/throughput.py` — {episodes} timed episodes per measurement, median of {rounds} interleaved rounds, "
        f"{machine()['cpu_count']} cores, torch {torch.__version__}. The shipped default (CLI and run.sh) is kept buffers + channels_last.\n\n"
    )
    write_results("throughput", {"machine": machine(), "rows": rows, "episodes": episodes, "rounds": rounds}, header + "\n".join(lines) + "\n", origin)


if __name__ == "__main__":
    main()

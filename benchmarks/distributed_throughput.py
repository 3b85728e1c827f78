"""Training throughput with torchrun: one process vs several, on this machine's CPU (or GPUs when present).

Each configuration trains the same recipe through the CLI under ``torchrun``
(``--nproc_per_node`` 1 and 2 on CPU, the cores split evenly between the
processes; on a GPU machine one process per GPU) and reads the training
seconds from ``train_summary.json`` (start-up and data loading excluded).
Every rank scores ``meta_batch`` episodes per iteration, so N processes
train on N times the episodes per iteration: the figure compared is
episodes per second, and the ratio is against one process in the same run.
Configurations alternate over rounds; medians are reported.

    python benchmarks/distributed_throughput.py                 # ProtoNet Conv-4, Omniglot 20w5s5q
    python benchmarks/distributed_throughput.py --method maml   # Finn et al.'s MAML recipe, meta-batch 32 per process
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import REPO, add_allow_dirty, data_root, machine, provenance, write_results  # noqa: E402
from fewshot_nsl.runtime import FAST_MALLOC  # noqa: E402

RECIPES = {
    "protonet": ["--method", "protonet", "--ways", "20", "--shots", "5", "--queries", "5"],
    "maml": ["--config", str(REPO / "configs" / "maml-conv4-omniglot.yaml")],
}


def train_seconds(processes: int, threads: int, recipe: list[str], episodes: int, device: str, work: Path) -> float:
    run_dir = work / f"run-{processes}"
    environment = dict(os.environ, OMP_NUM_THREADS=str(threads), GLIBC_TUNABLES=FAST_MALLOC, FEWSHOT_NSL_DATA=data_root())
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", "-m", "fewshot_nsl",
         "train", *recipe, "--episodes", str(episodes), "--val-every", str(10 * episodes), "--val-episodes", "10",
         "--device", device, "--run-dir", str(run_dir), "--overwrite", "--no-progress"],
        env=environment, check=True, capture_output=True,
    )  # fmt: skip
    return json.loads((run_dir / "train_summary.json").read_text())["train_seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=RECIPES, default="protonet")
    parser.add_argument("--episodes", type=int, default=300, help="training iterations per configuration")
    parser.add_argument("--rounds", type=int, default=3)
    add_allow_dirty(parser)
    args = parser.parse_args()
    origin = provenance(args.allow_dirty)
    gpus = torch.cuda.device_count()
    cores = os.cpu_count() or 1
    if gpus:
        device, layouts = "cuda", {n: 1 for n in sorted({1, gpus})}
    else:
        device, layouts = "cpu", {n: max(1, cores // n) for n in (1, 2)}
    recipe = RECIPES[args.method]
    meta_batch = 32 if args.method == "maml" else 1
    seconds: dict[int, list[float]] = {n: [] for n in layouts}
    with tempfile.TemporaryDirectory() as work:
        for _ in range(args.rounds):
            for processes, threads in layouts.items():
                seconds[processes].append(train_seconds(processes, threads, recipe, args.episodes, device, Path(work)))
    rows = []
    for processes, threads in layouts.items():
        median = statistics.median(seconds[processes])
        rows.append({"processes": processes, "threads_each": threads, "seconds": median,
                     "episodes_per_s": processes * meta_batch * args.episodes / median})  # fmt: skip
    base = rows[0]["episodes_per_s"]
    lines = ["| processes | threads each | train s | episodes/s | ÷ one process |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['processes']} | {r['threads_each'] if device == 'cpu' else 'GPU'} | {r['seconds']:.1f} | "
            f"{r['episodes_per_s']:.1f} | {r['episodes_per_s'] / base:.2f}× |"
        )
    info = machine()
    text = (
        f"# Training throughput under torchrun ({args.method}, {device})\n\n"
        f"`python benchmarks/distributed_throughput.py {' '.join(sys.argv[1:])}` — {args.rounds} alternating rounds, "
        f"medians; {args.episodes} iterations per run, every process scoring {meta_batch} episode(s) per iteration; "
        f"{info['cpu_count']} cores, torch {info['torch']}, {'GPU ' + str(info['cuda']) if gpus else 'no GPU'}. "
        "Training seconds from each run's train_summary.json (start-up excluded).\n\n" + "\n".join(lines) + "\n"
    )
    write_results(f"distributed_throughput_{args.method}_{device}", {"machine": info, "rows": rows}, text, origin)


if __name__ == "__main__":
    main()

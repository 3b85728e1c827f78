"""Accuracy suites: train with a stated budget, evaluate on the fixed manifests, tabulate.

Every run goes through the same code as the CLI (``train`` then ``evaluate_run``)
and lands in a suite leaderboard under ``benchmarks/results/``; the table
written next to it states the training iterations and wall time of each run.

    python benchmarks/accuracy.py protonet-omniglot --episodes 6000
    python benchmarks/accuracy.py nsl-omniglot --episodes 3000
    python benchmarks/accuracy.py maml-omniglot --episodes 1500

Published references: ProtoNet (Snell et al. 2017, Omniglot Vinyals split, Conv-4)
5w1s 98.8, 5w5s 99.7, 20w1s 96.0, 20w5s 98.9; MAML (Finn et al. 2017) 5w1s 98.7±0.4,
20w1s 95.8±0.3.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import RESULTS, data_root, machine, write_results  # noqa: E402
from fewshot_nsl.config import RunConfig  # noqa: E402
from fewshot_nsl.engine.evaluator import EvalRequest, evaluate_run  # noqa: E402
from fewshot_nsl.engine.trainer import train  # noqa: E402

PUBLISHED = {
    ("protonet", 5, 1): 98.8, ("protonet", 5, 5): 99.7, ("protonet", 20, 1): 96.0, ("protonet", 20, 5): 98.9,
    ("maml", 5, 1): 98.7, ("maml", 20, 1): 95.8,
}  # fmt: skip


@dataclass(frozen=True)
class Run:
    name: str
    config: dict
    evals: tuple[tuple[int, int], ...]  # (ways, shots) on the fixed test manifests


@dataclass(frozen=True)
class Suite:
    runs: tuple[Run, ...]
    note: str = ""
    defaults: dict = field(default_factory=dict)


PROTONET = {"method": "protonet", "backbone": "conv4", "ways": 60, "queries": 5, "lr_step": 2000, "val_ways": 20}
NSL_STATIC = {"backbone": "nsl-conv4", "similarity": "static"}
NSL_DYNAMIC = {"backbone": "nsl-conv4", "similarity": "dynamic"}
MAML = {"method": "maml", "backbone": "conv4", "queries": 15, "meta_batch": 32, "lr_step": 10**9}



def protonet_runs(prefix: str, extra: dict) -> tuple[Run, ...]:
    return (
        Run(f"{prefix}-1shot", PROTONET | extra | {"shots": 1}, ((5, 1), (20, 1))),
        Run(f"{prefix}-5shot", PROTONET | extra | {"shots": 5}, ((5, 5), (20, 5))),
    )


NSL_VARIANTS = (
    ("conv4", {}),
    ("nsl-static", NSL_STATIC),
    ("nsl-dynamic", NSL_DYNAMIC),
    ("nsl-dynamic-h32", NSL_DYNAMIC | {"nsl_hidden": 32}),
    ("nsl-dynamic-h16", NSL_DYNAMIC | {"nsl_hidden": 16}),
)


SUITES = {
    "protonet-omniglot": Suite(
        protonet_runs("protonet-conv4", {"train_on_val": True}),
        note="As Snell et al.: 60-way training episodes (5 queries) with the evaluation shot, on the 1200 train + val "
        "characters × 4 rotations, Adam 1e-3 halved every 2000 iterations; the last checkpoint is evaluated.",
    ),
    "nsl-omniglot": Suite(
        tuple(
            Run(f"protonet-{label}-20w5s", PROTONET | extra | {"ways": 20, "shots": 5}, ((20, 1), (20, 5)))
            for label, extra in NSL_VARIANTS
        ),
        note="conv4, static NSL (diagonal) and dynamic NSL (diagonal; meta-network width h = 64 unless the run name "
        "says h32/h16) share recipe (20-way 5-shot 5-query training episodes), seed, training iterations and "
        "evaluation manifests. Training wall times are only comparable between runs made on a quiet machine; "
        "benchmarks/results/nsl_overhead.md measures speed properly.",
    ),
    "maml-omniglot": Suite(
        (
            Run("maml-conv4-5w1s", MAML | {"ways": 5, "shots": 1}, ((5, 1),)),
            Run("maml-nsl-static-5w1s", MAML | NSL_STATIC | {"ways": 5, "shots": 1}, ((5, 1),)),
            Run("maml-conv4-20w1s", MAML | {"ways": 20, "shots": 1, "meta_batch": 16, "inner_lr": 0.1, "inner_steps": 5, "eval_inner_steps": 5}, ((20, 1),)),
            Run("maml-nsl-static-20w1s", MAML | NSL_STATIC | {"ways": 20, "shots": 1, "meta_batch": 16, "inner_lr": 0.1, "inner_steps": 5, "eval_inner_steps": 5}, ((20, 1),)),
        ),
        note="20-way MAML follows Finn et al.: meta-batch 16, inner lr 0.1, 5 inner steps.",
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suite", choices=SUITES)
    parser.add_argument("--episodes", type=int, required=True, help="training iterations of every run")
    parser.add_argument("--val-every", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="*", help="run only these run names (others are read from the suite leaderboard)")
    parser.add_argument("--meta-batch", type=int, help="override the meta-batch of every run")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    suite = SUITES[args.suite]
    board = RESULTS / f"{args.suite}-leaderboard.csv"
    runs_root = Path(os.environ.get("FEWSHOT_NSL_RUNS", "runs")) / "benchmarks" / args.suite
    for run in suite.runs:
        if args.only and run.name not in args.only:
            continue
        config = RunConfig().updated(
            run.config | {"episodes": args.episodes, "seed": args.seed, "val_every": args.val_every,
                          "data_root": data_root(), "device": args.device, "run_dir": str(runs_root / run.name)}
            | ({"meta_batch": args.meta_batch} if args.meta_batch else {})
        )  # fmt: skip
        started = time.perf_counter()
        result = train(config, overwrite=True, progress=sys.stderr.isatty())
        print(f"{run.name}: trained {result.iterations} iterations in {result.seconds:.0f} s")
        for ways, shots in run.evals:
            summary, _ = evaluate_run(EvalRequest(result.run_dir, ways=ways, shots=shots, leaderboard=board, progress=False))
            print(f"{run.name}: {ways}-way {shots}-shot {summary} ({time.perf_counter() - started:.0f} s incl. training)")
    tabulate(args.suite, suite, board, "python benchmarks/accuracy.py " + " ".join(sys.argv[1:]))


def tabulate(name: str, suite: Suite, board: Path, command: str) -> None:
    frame = pd.read_csv(board)
    names = {run.name for run in suite.runs}
    frame = frame[frame["run_dir"].map(lambda d: Path(d).name in names)]
    latest = frame.drop_duplicates(subset=["run_dir", "ways", "shots"], keep="last")
    lines = [
        "| run | method | similarity | task | acc % ± 95% CI | published | train iterations | train wall time | episodes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in latest.sort_values(["ways", "shots", "method", "similarity"]).itertuples():
        ref = PUBLISHED.get((row.method, row.ways, row.shots)) if row.similarity == "conv" else None
        lines.append(
            f"| {Path(row.run_dir).name} | {row.method} | {row.similarity} | {row.ways}w{row.shots}s | "
            f"{100 * row.acc:.2f} ± {100 * row.ci95:.2f} | {ref if ref else '—'} | {row.train_episodes} | "
            f"{row.train_seconds / 60:.1f} min | {row.episodes} ({row.manifest}) |"
        )
    info = machine()
    text = (
        f"# Accuracy suite `{name}`\n\nLast command: `{command}`, on {info['cpu_count']} "
        f"CPU cores (torch {info['torch']}, device {'cuda' if info['cuda'] else 'cpu'}). {suite.note}\n\n"
        + "\n".join(lines) + "\n"
    )
    write_results(f"{name}-accuracy", {"machine": info, "rows": latest.to_dict(orient="records")}, text)


if __name__ == "__main__":
    main()

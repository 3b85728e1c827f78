"""How far does a rerun of one training move when only the order of floating-point sums changes?

Issue 12 asks that the short ``nsl-omniglot`` accuracies stay "the same within
CI" when the dynamic layers move to the compiled kernels, and the suite's rerun
table (``benchmarks/results/nsl-omniglot-accuracy.md``) reads that as: each
rerun differs from the run before the kernels by less than the 95% CI of a
difference (the two episode CIs in quadrature). Those CIs cover the test
episodes, not training. This script measures the training part on one commit,
with nothing changed but how sums are ordered: the suite's run (same recipe,
seed, training episodes and test manifests) is trained

- on the kernels and on the PyTorch path (``nsl_kernels: false``, the
  implementation the kernels replaced: the same function summed in another order),
- each with 2 threads and with 1 thread (both implementations split their
  reductions by thread, so the thread count alone changes the order), and
- on the kernels with 2 threads twice (identical code and threads: the two must
  agree exactly, or the comparison measures something other than summation order).

Each training is evaluated on the suite's fixed manifests and compared with the
others by the suite's own rule. Results are written after every training, and a
rerun of the script on the same commit skips trainings it already has, so it can
be stopped and continued.

    python benchmarks/nsl_rerun_spread.py                   # about 40 min on 2 cores
    python benchmarks/nsl_rerun_spread.py --runs protonet-nsl-dynamic-h16-20w5s protonet-nsl-dynamic-h16-20w5s-seed1
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.accuracy import SUITES, Run, difference_bound  # noqa: E402
from benchmarks.common import RESULTS, add_allow_dirty, data_root, last_command, machine, provenance, write_results  # noqa: E402
from fewshot_nsl.engine.evaluator import EvalRequest, evaluate_run  # noqa: E402
from fewshot_nsl.engine.trainer import train  # noqa: E402

SUITE = "nsl-omniglot"
NAME = "nsl_rerun_spread"
SUITE_EPISODES = 3000  # the suite's documented budget (README: python benchmarks/accuracy.py nsl-omniglot --episodes 3000)


@dataclass(frozen=True)
class Variant:
    label: str
    kernels: bool
    threads: int


VARIANTS = (
    Variant("kernels, 2 threads", True, 2),
    Variant("kernels, 2 threads, again", True, 2),
    Variant("kernels, 1 thread", True, 1),
    Variant("PyTorch path, 2 threads", False, 2),
    Variant("PyTorch path, 1 thread", False, 1),
)
REPEATED = (VARIANTS[0].label, VARIANTS[1].label)


def train_and_evaluate(run: Run, variant: Variant, episodes: int, seed: int, runs_root: Path) -> dict:
    """One training of ``run`` as ``variant``, evaluated on the run's manifests."""
    threads = torch.get_num_threads()
    torch.set_num_threads(variant.threads)
    try:
        run_dir = runs_root / run.name / variant.label.replace(", ", "-").replace(" ", "-")
        config = run.run_config().updated({
            "episodes": episodes, "seed": seed + run.seed_offset, "nsl_kernels": variant.kernels,
            "data_root": data_root(), "device": "cpu", "run_dir": str(run_dir),
        })  # fmt: skip
        result = train(config, overwrite=True, progress=sys.stderr.isatty())
        tasks = {}
        for ways, shots in run.evals:
            request = EvalRequest(run_dir, ways=ways, shots=shots, episodes=run.eval_episodes, progress=False,
                                  leaderboard=RESULTS / "nsl-rerun-spread-leaderboard.csv", device="cpu")  # fmt: skip
            summary, _ = evaluate_run(request)
            tasks[f"{ways}w{shots}s"] = {"acc": 100 * summary.mean, "ci95": 100 * summary.ci95}
    finally:
        torch.set_num_threads(threads)
    return {"run": run.name, "variant": variant.label, "kernels": variant.kernels, "threads": variant.threads,
            "train_seconds": result.seconds, "tasks": tasks}  # fmt: skip


def comparisons(trainings: list[dict]) -> list[dict]:
    """Every pair of trainings of one run, per task: difference and the suite's bound (CIs in quadrature).
    The repeated training is paired with its original only (elsewhere it would count each pair twice)."""
    rows = []
    for first, second in combinations(trainings, 2):
        labels = {first["variant"], second["variant"]}
        if first["run"] != second["run"] or (REPEATED[1] in labels and labels != set(REPEATED)):
            continue
        for task, a in first["tasks"].items():
            b = second["tasks"][task]
            difference = b["acc"] - a["acc"]
            bound = difference_bound(a["ci95"], b["ci95"])
            rows.append({"run": first["run"], "task": task, "first": first["variant"], "second": second["variant"],
                         "difference": difference, "bound": bound, "within": abs(difference) < bound})  # fmt: skip
    return rows


def what_changes(first: str, second: str) -> str:
    if {first, second} == set(REPEATED):
        return "nothing (same code, same threads)"
    a, b = (next(v for v in VARIANTS if v.label == label) for label in (first, second))
    changed = (["implementation"] if a.kernels != b.kernels else []) + (["threads"] if a.threads != b.threads else [])
    return " and ".join(changed)


def markdown(trainings: list[dict], pairs: list[dict], command: str, episodes: int) -> str:
    tasks = sorted({task for t in trainings for task in t["tasks"]})
    lines = [
        f"# Rerun spread of `{SUITE}` trainings: same commit, only the summation order changes", "",
        f"{last_command(command)} Each training: "
        f"the `{SUITE}` suite's recipe and seed, {episodes} iterations, evaluated on its fixed test manifests "
        "(± 95% CI over the test episodes). `PyTorch path` trains with `nsl_kernels: false`, the implementation "
        "the kernels replaced; the thread count changes how both implementations split their sums.", "",
        "| run | training | " + " | ".join(f"{task} acc %" for task in tasks) + " | train wall time |",
        "|---|---|" + "---|" * len(tasks) + "---|",
    ]
    for t in trainings:
        cells = " | ".join(f"{t['tasks'][task]['acc']:.2f} ± {t['tasks'][task]['ci95']:.2f}" for task in tasks)
        lines.append(f"| {t['run']} | {t['variant']} | {cells} | {t['train_seconds'] / 60:.1f} min |")
    lines += [
        "", "Every pair of trainings of a run, read by the suite's rule (within: the difference is smaller than "
        "the 95% CI of a difference of two independent estimates, the CIs in quadrature):", "",
        "| run | task | training | other training | what differs | difference | within the CIs |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in pairs:
        lines.append(
            f"| {p['run']} | {p['task']} | {p['first']} | {p['second']} | {what_changes(p['first'], p['second'])} | "
            f"{p['difference']:+.2f} | {'yes' if p['within'] else 'no'} (±{p['bound']:.2f}) |"
        )
    outside = [p for p in pairs if not p["within"]]
    lines += ["", f"{len(pairs) - len(outside)} of {len(pairs)} pairs within the CIs; largest difference "
              f"{max((abs(p['difference']) for p in pairs), default=0):.2f} points."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    suite_runs = {run.name: run for run in SUITES[SUITE].runs}
    dynamic = [name for name, run in suite_runs.items() if run.config.get("similarity") == "dynamic"]
    parser.add_argument("--runs", nargs="+", choices=dynamic, default=["protonet-nsl-dynamic-h16-20w5s"])
    parser.add_argument("--episodes", type=int, default=SUITE_EPISODES, help="training iterations (default: the suite's)")
    parser.add_argument("--seed", type=int, default=0, help="the suite's --seed (each run adds its own offset)")
    add_allow_dirty(parser)
    args = parser.parse_args()
    origin = provenance(args.allow_dirty)
    runs_root = Path(os.environ.get("FEWSHOT_NSL_RUNS", "runs")) / "benchmarks" / NAME
    saved = RESULTS / f"{NAME}.json"
    previous = json.loads(saved.read_text()) if saved.exists() else {}
    same_setup = previous.get("provenance") == origin and previous.get("episodes") == args.episodes and previous.get("seed") == args.seed
    trainings = [t for t in previous.get("trainings", []) if same_setup and t["run"] in args.runs]
    command = "python benchmarks/nsl_rerun_spread.py " + " ".join(sys.argv[1:])
    for name in args.runs:
        for variant in VARIANTS:
            if any(t["run"] == name and t["variant"] == variant.label for t in trainings):
                continue
            started = time.perf_counter()
            trainings.append(train_and_evaluate(suite_runs[name], variant, args.episodes, args.seed, runs_root))
            print(f"{name}, {variant.label}: {trainings[-1]['tasks']} ({time.perf_counter() - started:.0f} s)")
            pairs = comparisons(trainings)
            payload = {"episodes": args.episodes, "seed": args.seed, "machine": machine(), "trainings": trainings, "pairs": pairs}
            write_results(NAME, payload, markdown(trainings, pairs, command, args.episodes), origin)


if __name__ == "__main__":
    main()

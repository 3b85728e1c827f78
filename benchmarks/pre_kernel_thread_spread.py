"""Does the code before the kernels meet issue 12's accuracy rule against itself?

Issue 12 asks that the short ``nsl-omniglot`` accuracies stay "the same within
CI" after the dynamic layers moved to compiled kernels; the suite reads that as:
each rerun differs from the run before the kernels by less than the 95% CI of a
difference (the two episode CIs in quadrature, ``difference_bound``). Two h=16
runs fail it. ``nsl_rerun_spread.py`` showed that, on today's code, the thread
count alone moves a training that far, but today's PyTorch path is not the code
the recorded runs came from. This script asks the question of that code itself:
each recorded pre-kernel result is retrained on the very commit that produced it,
with that commit's own ``benchmarks/accuracy.py`` (checked out as a git worktree),

- with 2 threads, as the recorded result was trained on this 2-core machine: it
  must reproduce the recorded accuracies exactly, or something other than the
  thread count differs, and
- with 1 thread: the same code, recipe, seed, episodes and manifests, only the
  reductions split differently,

and reads the pairs by the suite's rule. Results are written after every
training, and a rerun of this script on the same commit skips trainings it
already has.

    python benchmarks/pre_kernel_thread_spread.py     # about 40 min on 2 cores, alone
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.accuracy import difference_bound  # noqa: E402
from benchmarks.common import REPO, add_allow_dirty, data_root, last_command, machine, provenance, write_results  # noqa: E402

NAME = "pre_kernel_thread_spread"
SUITE = "nsl-omniglot"
SUITE_EPISODES = 3000  # the suite's documented budget (README: python benchmarks/accuracy.py nsl-omniglot --episodes 3000)
# Run -> the commit whose training is the "before the kernels" column of the README's rerun table
# (the kernels arrived in 964f1bb; 35fa380 added the second seed).
ORIGINALS = {
    "protonet-nsl-dynamic-h16-20w5s": "7151195",
    "protonet-nsl-dynamic-h16-20w5s-seed1": "35fa380",
}
RECORDED_THREADS = 2  # the recorded trainings ran with torch's default on this 2-core machine
THREADS = (RECORDED_THREADS, 1)
LEADERBOARD = f"benchmarks/results/{SUITE}-leaderboard.csv"


def label(threads: int) -> str:
    return f"retrained, {threads} thread{'s' if threads > 1 else ''}"


def git(*args: str, cwd: Path = REPO) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout


def accuracies(board: pd.DataFrame, commit: str, run_dir_suffix: str) -> dict[str, dict[str, float]]:
    """The newest accuracy per task of one training in a suite leaderboard, in percent."""
    rows = board[board["git_commit"].astype(str).str.startswith(commit) & board["run_dir"].str.endswith(run_dir_suffix)]
    if rows.empty:
        raise SystemExit(f"no leaderboard row of {run_dir_suffix} from {commit}")
    latest = rows.groupby(["ways", "shots"]).tail(1)
    return {f"{r.ways}w{r.shots}s": {"acc": 100 * r.acc, "ci95": 100 * r.ci95} for r in latest.itertuples()}


def recorded(run: str, commit: str) -> dict[str, dict[str, float]]:
    """The result that commit recorded for the run, from the suite's committed (append-only) leaderboard."""
    return accuracies(pd.read_csv(REPO / LEADERBOARD), commit, f"/{run}")


def worktree(commit: str, root: Path) -> Path:
    """A clean checkout of ``commit`` beside the runs (created once, reused by a resumed script)."""
    path = (root / f"code-{commit}").resolve()
    if not path.exists():
        git("worktree", "add", "--detach", str(path), commit)
    git("checkout", "--", ".", cwd=path)  # drop results a stopped training may have left there
    return path


def retrain(run: str, commit: str, threads: int, episodes: int, root: Path) -> dict[str, dict[str, float]]:
    """Train and evaluate ``run`` with ``commit``'s own suite script and ``threads`` torch threads."""
    code = worktree(commit, root)
    env = dict(os.environ, PYTHONPATH=str(code), FEWSHOT_NSL_DATA=data_root(),
               FEWSHOT_NSL_RUNS=str((root / f"t{threads}").resolve()))  # fmt: skip
    imported = subprocess.run([sys.executable, "-c", "import fewshot_nsl; print(fewshot_nsl.__file__)"],
                              cwd=code, env=env, capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    if not Path(imported).is_relative_to(code):
        raise SystemExit(f"the worktree of {commit} imports fewshot_nsl from {imported}, not from {code}")
    command = [sys.executable, "benchmarks/accuracy.py", SUITE, "--episodes", str(episodes), "--only", run,
               "--threads", str(threads)]  # fmt: skip
    subprocess.run(command, cwd=code, env=env, check=True)
    board = pd.read_csv(code / LEADERBOARD)
    result = accuracies(board, commit, f"t{threads}/benchmarks/{SUITE}/{run}")
    git("checkout", "--", ".", cwd=code)  # the next training's provenance check needs a clean tree
    return result


def pairs(trainings: list[dict]) -> list[dict]:
    """Per run and task: each retraining against the recorded result, and 1 thread against 2, by the suite's rule."""
    rows = []
    for run in ORIGINALS:
        mine = {t["label"]: t["tasks"] for t in trainings if t["run"] == run}
        for first, second in (("recorded", label(RECORDED_THREADS)), ("recorded", label(1)), (label(RECORDED_THREADS), label(1))):
            if first not in mine or second not in mine:
                continue
            for task, a in mine[first].items():
                b = mine[second][task]
                difference, bound = b["acc"] - a["acc"], difference_bound(a["ci95"], b["ci95"])
                rows.append({"run": run, "task": task, "first": first, "second": second, "difference": difference,
                             "bound": bound, "within": abs(difference) < bound})  # fmt: skip
    return rows


def markdown(trainings: list[dict], rows: list[dict], command: str, episodes: int) -> str:
    tasks = sorted({task for t in trainings for task in t["tasks"]})
    lines = [
        f"# The code before the kernels against itself: `{SUITE}` h=16 retrained on its own commits", "",
        f"{last_command(command)} Each run is retrained "
        f"with the `benchmarks/accuracy.py` of the commit that recorded it ({episodes} iterations, the suite's recipe, "
        "seed and fixed test manifests; ± 95% CI over the test episodes); `recorded` is that commit's own "
        "committed leaderboard row.", "",
        "| run | code | training | " + " | ".join(f"{task} acc %" for task in tasks) + " |",
        "|---|---|---|" + "---|" * len(tasks),
    ]
    for t in trainings:
        cells = " | ".join(f"{t['tasks'][task]['acc']:.2f} ± {t['tasks'][task]['ci95']:.2f}" for task in tasks)
        lines.append(f"| {t['run']} | {t['commit']} | {t['label']} | {cells} |")
    lines += [
        "", "Read by the suite's rule (within: the difference is smaller than the 95% CI of a difference of two "
        "independent estimates, the CIs in quadrature):", "",
        "| run | task | training | other training | difference | within the CIs |", "|---|---|---|---|---|---|",
    ]
    for p in rows:
        lines.append(f"| {p['run']} | {p['task']} | {p['first']} | {p['second']} | {p['difference']:+.2f} | "
                     f"{'yes' if p['within'] else 'no'} (±{p['bound']:.2f}) |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=SUITE_EPISODES, help="training iterations (default: the suite's)")
    add_allow_dirty(parser)
    args = parser.parse_args()
    origin = provenance(args.allow_dirty)
    root = Path(os.environ.get("FEWSHOT_NSL_RUNS", "runs")) / "benchmarks" / NAME
    saved = Path(__file__).resolve().parent / "results" / f"{NAME}.json"
    previous = json.loads(saved.read_text()) if saved.exists() else {}
    same_setup = previous.get("provenance") == origin and previous.get("episodes") == args.episodes
    trainings = previous.get("trainings", []) if same_setup else []
    command = "python benchmarks/pre_kernel_thread_spread.py " + " ".join(sys.argv[1:])
    plan = [(run, commit, "recorded", None) for run, commit in ORIGINALS.items()]
    plan += [(run, commit, label(t), t) for run, commit in ORIGINALS.items() for t in THREADS]  # one run whole, then the next
    for run, commit, training, threads in plan:
        if any(t["run"] == run and t["label"] == training for t in trainings):
            continue
        tasks = recorded(run, commit) if threads is None else retrain(run, commit, threads, args.episodes, root)
        trainings.append({"run": run, "commit": commit, "label": training, "threads": threads, "tasks": tasks})
        rows = pairs(trainings)
        payload = {"episodes": args.episodes, "machine": machine(), "trainings": trainings, "pairs": rows}
        write_results(NAME, payload, markdown(trainings, rows, command, args.episodes), origin)
    for commit in set(ORIGINALS.values()):
        git("worktree", "remove", "--force", str(worktree(commit, root)))


if __name__ == "__main__":
    main()

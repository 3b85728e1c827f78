"""Exemplar-CNN pretraining against untrained, supervised and fine-tuned backbones, few-shot, on a CPU budget.

For each dataset and backbone (conv4, and nsl-conv4 with its default static diagonal NSL), one table row each:

* random init: the untrained backbone (seeded like every run) under the prototype head;
* exemplar, prototype head / logreg head: Exemplar-CNN pretraining on the training images without
  their labels (``--method exemplar``), scored by ProtoNet's class means or by a logistic regression
  per episode (Tian et al. 2020);
* ProtoNet: supervised episodic training from scratch;
* exemplar → ProtoNet: the same ProtoNet training started from the exemplar backbone (``--init``).

All rows of a dataset are evaluated on the same fixed test manifests (Omniglot Vinyals 5-way and
20-way 1-shot, 1000 episodes; Mini-ImageNet 5-way 1- and 5-shot, the standard 600) and land in
``benchmarks/results/exemplar-leaderboard.csv``. Budgets are iterations per run, stated in the table.

    python benchmarks/exemplar.py                                   # both datasets, defaults below
    python benchmarks/exemplar.py --datasets omniglot --omniglot-iterations 600 300
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import RESULTS, data_root, machine, provenance, write_results  # noqa: E402
from fewshot_nsl.config import RunConfig  # noqa: E402
from fewshot_nsl.data.registry import load_split, resolve_protocol  # noqa: E402
from fewshot_nsl.engine.evaluator import EvalRequest, evaluate_learner, evaluate_run, select_manifest  # noqa: E402
from fewshot_nsl.engine.trainer import train  # noqa: E402
from fewshot_nsl.learners import build_learner  # noqa: E402
from fewshot_nsl.runtime import memory_format, seeded  # noqa: E402

TASKS = {"omniglot": ((5, 1), (20, 1)), "miniimagenet": ((5, 1), (5, 5))}
# ProtoNet training episodes: Omniglot 20-way 5-shot 5-query (Snell et al.'s 60-way cut to a CPU's budget, as
# in the nsl-omniglot suite); Mini-ImageNet 5-way 5-shot 15-query (the protonet-miniimagenet suite's CPU variant).
PROTONET = {"omniglot": {"ways": 20, "shots": 5, "queries": 5}, "miniimagenet": {"ways": 5, "shots": 5, "queries": 15}}
BACKBONES = {"conv4": {"backbone": "conv4"}, "nsl-conv4": {"backbone": "nsl-conv4", "similarity": "static"}}
ROWS = ("random init", "exemplar, prototype head", "exemplar, logreg head", "ProtoNet", "exemplar → ProtoNet")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", choices=tuple(TASKS), default=list(TASKS))
    parser.add_argument("--backbones", nargs="+", choices=tuple(BACKBONES), default=list(BACKBONES))
    parser.add_argument("--omniglot-iterations", type=int, nargs=2, default=(1500, 1500), metavar=("EXEMPLAR", "PROTONET"))
    parser.add_argument("--miniimagenet-iterations", type=int, nargs=2, default=(600, 600), metavar=("EXEMPLAR", "PROTONET"))
    parser.add_argument("--surrogate-classes", type=int, default=8000)
    parser.add_argument("--samples-per-class", type=int, default=100)
    parser.add_argument("--allow-dirty", action="store_true", help="run from uncommitted code (results marked so)")
    args = parser.parse_args()
    origin = provenance(args.allow_dirty)
    board = RESULTS / "exemplar-leaderboard.csv"
    runs_root = Path(os.environ.get("FEWSHOT_NSL_RUNS", "runs")) / "benchmarks" / "exemplar"
    results: list[dict] = []
    for dataset in args.datasets:
        exemplar_iterations, protonet_iterations = getattr(args, f"{dataset}_iterations")
        for backbone_name, backbone in BACKBONES.items():
            if backbone_name not in args.backbones:
                continue
            common = RunConfig().updated({"dataset": dataset, "data_root": data_root(), "seed": 0, **backbone})

            def run_dir(label: str) -> str:
                return str(runs_root / f"{dataset}-{backbone_name}-{label}")  # noqa: B023

            exemplar = common.updated({
                "method": "exemplar", "surrogate_classes": args.surrogate_classes, "samples_per_class": args.samples_per_class,
                "episodes": exemplar_iterations, "val_every": exemplar_iterations, "run_dir": run_dir("exemplar"),
            })  # fmt: skip
            supervised = common.updated({**PROTONET[dataset], "episodes": protonet_iterations, "val_every": protonet_iterations})
            runs = {
                "exemplar": (exemplar, ("prototype", "logreg")),
                "ProtoNet": (supervised.updated({"run_dir": run_dir("protonet")}), (None,)),
                "exemplar → ProtoNet": (supervised.updated({"init": run_dir("exemplar"), "run_dir": run_dir("finetuned")}), (None,)),
            }
            for ways, shots in TASKS[dataset]:
                results.append(random_init(common, dataset, backbone_name, ways, shots))
            for label, (config, heads) in runs.items():
                started = time.perf_counter()
                trained = train(config, overwrite=True, progress=sys.stderr.isatty())
                minutes = (time.perf_counter() - started) / 60
                for head in heads:
                    row_label = f"exemplar, {head} head" if head else label
                    for ways, shots in TASKS[dataset]:
                        request = EvalRequest(trained.run_dir, ways=ways, shots=shots, leaderboard=board, progress=False, head=head)
                        summary, row = evaluate_run(request)
                        results.append({"dataset": dataset, "backbone": backbone_name, "row": row_label, "task": f"{ways}w{shots}s",
                                        "acc": summary.mean, "ci95": summary.ci95, "iterations": config.episodes,
                                        "train_minutes": minutes, "manifest": row["manifest"]})  # fmt: skip
                        print(f"{dataset} {backbone_name} {row_label} {ways}w{shots}s: {summary}", flush=True)
    tabulate(results, args, origin)


def random_init(config: RunConfig, dataset: str, backbone_name: str, ways: int, shots: int) -> dict:
    """The untrained backbone under the prototype head, on the same manifest as the trained rows."""
    config = config.updated({"method": "protonet", "protocol": resolve_protocol(dataset, config.protocol)}).resolve()
    test_set = load_split(dataset, "test", config.protocol, config.data_root, None)
    manifest = select_manifest(EvalRequest(Path("-"), ways=ways, shots=shots), config, test_set)
    with seeded(config.seed):
        learner = build_learner(config, test_set.image_shape)
    layout = memory_format(bool(config.channels_last))
    summary, _ = evaluate_learner(learner.to(memory_format=layout), test_set, manifest, torch.device("cpu"), layout, progress=False)
    print(f"{dataset} {backbone_name} random init {ways}w{shots}s: {summary}", flush=True)
    return {"dataset": dataset, "backbone": backbone_name, "row": "random init", "task": f"{ways}w{shots}s",
            "acc": summary.mean, "ci95": summary.ci95, "iterations": 0, "train_minutes": 0.0, "manifest": manifest.spec.name}  # fmt: skip


def tabulate(results: list[dict], args: argparse.Namespace, origin: dict) -> None:
    info = machine()
    sections = []
    for dataset in args.datasets:
        tasks = [f"{w}w{s}s" for w, s in TASKS[dataset]]
        lines = ["| backbone | row | iterations | " + " | ".join(f"{t} acc % ± 95% CI" for t in tasks) + " |",
                 "|---|---|---|" + "---|" * len(tasks)]  # fmt: skip
        for backbone in args.backbones:
            for label in ROWS:
                cells = {r["task"]: r for r in results if (r["dataset"], r["backbone"], r["row"]) == (dataset, backbone, label)}
                if not cells:
                    continue
                any_row = next(iter(cells.values()))
                budget = "—" if label == "random init" else str(any_row["iterations"])
                if label == "exemplar → ProtoNet":
                    budget = f"{getattr(args, f'{dataset}_iterations')[0]} + {any_row['iterations']}"
                values = [f"{100 * cells[t]['acc']:.2f} ± {100 * cells[t]['ci95']:.2f}" if t in cells else "" for t in tasks]
                lines.append(f"| {backbone} | {label} | {budget} | " + " | ".join(values) + " |")
        manifests = sorted({r["manifest"] for r in results if r["dataset"] == dataset})
        sections.append(f"## {dataset}\n\nManifests: {', '.join(manifests)}.\n\n" + "\n".join(lines))
    text = (
        "# Exemplar-CNN pretraining, few-shot, CPU budget\n\n"
        f"`python benchmarks/exemplar.py {' '.join(sys.argv[1:])}` on {info['cpu_count']} CPU cores (torch {info['torch']}). "
        f"Exemplar runs: {args.surrogate_classes} surrogate classes × {args.samples_per_class} samples, batches of 128, "
        "the paper's transformation magnitudes, Adam 1e-3; ProtoNet runs: Omniglot 20w5s5q, Mini-ImageNet 5w5s15q episodes, "
        "Adam 1e-3; the exemplar → ProtoNet row's budget is pretraining + fine-tuning iterations. nsl-conv4 is static "
        "diagonal NSL. Seed 0 everywhere; ±: 95% CI over the test episodes.\n\n" + "\n\n".join(sections) + "\n"
    )
    write_results("exemplar-accuracy", {"machine": info, "rows": results}, text, origin)


if __name__ == "__main__":
    main()

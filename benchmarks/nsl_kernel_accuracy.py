"""Do the fused kernels change what a trained learner scores? Same checkpoints, same episodes.

Retraining cannot answer this: the kernels sum in another order than the
PyTorch path, so a training run's trajectory parts from the old one, and
reruns of one seed and recipe spread as far as another seed would
(``benchmarks/results/nsl-omniglot-accuracy.md``). Here nothing is retrained.
Each trained dynamic-NSL run of the ``nsl-omniglot`` suite (its run
directories under ``runs/benchmarks/nsl-omniglot``, written by
``benchmarks/accuracy.py``) is evaluated from its best checkpoint on the
suite's fixed test manifests twice: with every dynamic layer on its default
path (the fused kernels, and the meta-network's evaluation kernel) and with
every dynamic layer on its PyTorch path. Reported: both accuracies with their
95% CIs, how many of the episodes score differently, and the largest
difference between the two paths' embeddings of the same test images.

    python benchmarks/nsl_kernel_accuracy.py        # a few minutes on 2 cores
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.accuracy import SUITES  # noqa: E402
from benchmarks.common import add_allow_dirty, data_root, machine, provenance, write_results  # noqa: E402
from benchmarks.nsl_overhead import on_pytorch_path  # noqa: E402
from fewshot_nsl.api import load_trained  # noqa: E402
from fewshot_nsl.data.registry import load_split  # noqa: E402
from fewshot_nsl.engine.evaluator import EvalRequest, evaluate_learner, select_manifest  # noqa: E402
from fewshot_nsl.learners import FewShotLearner  # noqa: E402
from fewshot_nsl.nsl import DynamicNSLConv2d  # noqa: E402
from fewshot_nsl.runtime import memory_format  # noqa: E402

SUITE = "nsl-omniglot"
# Test images embedded by both paths for the embedding comparison.
COMPARED_IMAGES = 1000


def dynamic_paths(learner: FewShotLearner) -> str:
    return ", ".join(m.path for m in learner.modules() if isinstance(m, DynamicNSLConv2d))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_allow_dirty(parser)
    args = parser.parse_args()
    origin = provenance(args.allow_dirty)
    runs_root = Path(os.environ.get("FEWSHOT_NSL_RUNS", "runs")) / "benchmarks" / SUITE
    device = torch.device("cpu")
    rows = []
    for run in SUITES[SUITE].runs:
        run_dir = runs_root / run.name
        if not (run_dir / "best.pt").is_file():
            print(f"{run.name}: no trained run under {run_dir}; skipped")
            continue
        trained = load_trained(run_dir, device="cpu")
        config = trained.config
        if config.similarity != "dynamic":
            continue
        layout = memory_format(bool(config.channels_last))
        kernels = trained.learner.to(memory_format=layout)
        pytorch = on_pytorch_path(kernels)
        test_set = load_split(config.dataset, "test", config.protocol, data_root(), config.image_size)
        images = test_set.to_float(test_set.images[:COMPARED_IMAGES]).to(memory_format=layout)
        with torch.no_grad():
            embedded_kernels, embedded_pytorch = kernels.embed(images), pytorch.embed(images)
        embedding_gap = float((embedded_kernels - embedded_pytorch).abs().max() / embedded_pytorch.abs().max())
        for ways, shots in run.evals:
            request = EvalRequest(run_dir, ways=ways, shots=shots, episodes=run.eval_episodes)
            manifest = select_manifest(request, config, test_set)
            summary_k, accuracies_k = evaluate_learner(kernels, test_set, manifest, device, layout, progress=False)
            summary_p, accuracies_p = evaluate_learner(pytorch, test_set, manifest, device, layout, progress=False)
            rows.append({
                "run": run.name, "task": f"{ways}w{shots}s", "episodes": len(manifest), "manifest": manifest.spec.name,
                "kernel_paths": dynamic_paths(kernels), "pytorch_paths": dynamic_paths(pytorch),
                "acc_kernels": 100 * summary_k.mean, "ci95_kernels": 100 * summary_k.ci95,
                "acc_pytorch": 100 * summary_p.mean, "ci95_pytorch": 100 * summary_p.ci95,
                "episodes_differing": sum(a != b for a, b in zip(accuracies_k, accuracies_p)),
                "max_relative_embedding_difference": embedding_gap,
            })  # fmt: skip
            print(rows[-1], flush=True)
    lines = [
        "| run | task | test episodes | acc % ± 95% CI, kernels | acc % ± 95% CI, PyTorch path | difference "
        "| episodes scored differently | largest embedding difference (relative) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['run']} | {r['task']} | {r['episodes']} | {r['acc_kernels']:.2f} ± {r['ci95_kernels']:.2f} "
            f"| {r['acc_pytorch']:.2f} ± {r['ci95_pytorch']:.2f} | {r['acc_kernels'] - r['acc_pytorch']:+.2f} "
            f"| {r['episodes_differing']} of {r['episodes']} | {r['max_relative_embedding_difference']:.1e} |"
        )
    info = machine()
    text = (
        "# Fused kernels and accuracy: the same checkpoints on both paths\n\n"
        f"`python benchmarks/nsl_kernel_accuracy.py` — {info['cpu_count']} cores, torch {info['torch']}. "
        f"The trained dynamic-NSL runs of the `{SUITE}` suite (best checkpoints), evaluated on the suite's fixed test "
        "manifests with every dynamic layer on its default path (the fused kernels) and on its PyTorch path "
        "(planes or patches, and the meta-network in PyTorch ops). The embedding difference is the largest absolute "
        f"difference over the first {COMPARED_IMAGES} test images' embeddings, over the largest embedding value.\n\n"
        + "\n".join(lines) + "\n"
    )
    write_results("nsl_kernel_accuracy", {"machine": info, "rows": rows}, text, origin)


if __name__ == "__main__":
    main()

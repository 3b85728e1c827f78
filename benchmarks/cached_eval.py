"""Embedding-cached evaluation against episode-by-episode evaluation, on the 10,000-episode manifests.

For a learner that does not adapt its backbone (ProtoNet), ``evaluate_learner`` embeds each
image the manifest uses once and scores every episode from the cache. This script times, in
one run on Mini-ImageNet's test split, for Conv-4 with plain convolutions and with dynamic NSL
(h = 16):

* the cached evaluation of the whole 10,000-episode 5-way 1-shot and 5-shot manifests;
* episode-by-episode evaluation of the first ``--sample`` episodes of each, extrapolated
  linearly to 10,000 (every episode costs the same: the same task shape);

and checks that the two agree on the sampled episodes. Weights are a fixed random
initialisation (speed does not depend on them; BatchNorm in eval mode).

    python benchmarks/cached_eval.py            # a few minutes on 2 cores
    python benchmarks/cached_eval.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import add_allow_dirty, data_root, machine, provenance, write_results  # noqa: E402
from fewshot_nsl.config import RunConfig  # noqa: E402
from fewshot_nsl.data.registry import load_split  # noqa: E402
from fewshot_nsl.engine.evaluator import evaluate_learner  # noqa: E402
from fewshot_nsl.episodes.manifest import ManifestSpec, stored_manifest  # noqa: E402
from fewshot_nsl.learners import build_learner  # noqa: E402
from fewshot_nsl.runtime import memory_format, seeded  # noqa: E402

EPISODES = 10000
VARIANTS = {"conv4": {"backbone": "conv4"}, "nsl-conv4 dynamic h16": {"backbone": "nsl-conv4", "similarity": "dynamic", "nsl_hidden": 16}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sample", type=int, default=200, help="episodes evaluated one by one (default 200)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 20 sampled episodes, cached run on 500")
    add_allow_dirty(parser)
    args = parser.parse_args()
    origin = provenance(args.allow_dirty)
    sample = 20 if args.quick else args.sample
    test_set = load_split("miniimagenet", "test", "ravi", data_root())
    device, layout = torch.device("cpu"), memory_format(True)
    rows = []
    for shots in (1, 5):
        manifest = stored_manifest(ManifestSpec("miniimagenet", "ravi", "test", 5, shots, 15, EPISODES), test_set)
        if manifest is None:
            raise SystemExit(f"the committed 5w{shots}s 10,000-episode manifest is missing")
        if args.quick:
            manifest = dataclasses.replace(manifest, classes=manifest.classes[:500], support=manifest.support[:500], query=manifest.query[:500])
        head = dataclasses.replace(
            manifest, classes=manifest.classes[:sample], support=manifest.support[:sample], query=manifest.query[:sample]
        )
        for variant, fields in VARIANTS.items():
            config = RunConfig(method="protonet", dataset="miniimagenet", **fields).resolve()
            with seeded(0):
                learner = build_learner(config, test_set.image_shape).to(device, memory_format=layout)
            started = time.perf_counter()
            _, cached = evaluate_learner(learner, test_set, manifest, device, layout, progress=False)
            cached_s = time.perf_counter() - started
            started = time.perf_counter()
            _, one_by_one = evaluate_learner(learner, test_set, head, device, layout, progress=False, per_episode=True)
            sampled_s = time.perf_counter() - started
            per_episode_s = sampled_s / sample * len(manifest)
            agree = max(abs(a - b) for a, b in zip(cached[:sample], one_by_one))
            rows.append({"task": f"5w{shots}s15q", "backbone": variant, "episodes": len(manifest), "cached_s": cached_s,
                         "per_episode_extrapolated_s": per_episode_s, "sampled": sample, "max_abs_difference": agree})  # fmt: skip
            print(rows[-1], flush=True)
    lines = [
        "# Embedding-cached evaluation, Mini-ImageNet test split\n",
        f"Command: `python benchmarks/cached_eval.py{' --quick' if args.quick else ''}`; {machine()['cpu_count']} CPU cores, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads. ProtoNet, random fixed weights, BatchNorm in eval mode. "
        f"Episode by episode: the first {sample} episodes timed and extrapolated to the manifest.\n",
        "| task | backbone | episodes | cached (s) | episode by episode (s, extrapolated) | speed-up | largest per-episode difference |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['task']} | {row['backbone']} | {row['episodes']} | {row['cached_s']:.1f} | "
            f"{row['per_episode_extrapolated_s']:.0f} ({row['per_episode_extrapolated_s'] / 60:.1f} min) | "
            f"{row['per_episode_extrapolated_s'] / row['cached_s']:.0f}× | {row['max_abs_difference']:.1e} |"
        )
    write_results("cached_eval", {"machine": machine(), "rows": rows, "sample": sample}, "\n".join(lines), origin)


if __name__ == "__main__":
    main()

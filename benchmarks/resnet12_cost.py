"""ResNet-12 on this machine: seconds per ProtoNet training episode and peak memory, conv vs NSL.

What a user needs a GPU for. For each backbone variant (ResNet-12 64-160-320-640 with
plain convolutions, static NSL, dynamic NSL with the cheapest and the default
meta-network) one Mini-ImageNet-shaped 5-way 5-shot 15-query training episode
(100 random 84×84 images; speed, not accuracy): forward, backward, Adam step.

* seconds: median of ``--repeats`` episodes after one untimed one, in a fresh process
  per variant (so one variant's allocator state does not help the next);
* peak memory: in another fresh process with glibc returning freed memory at once,
  the growth of peak resident memory over one episode after a warm-up one
  (``benchmarks.common.peak_rss_growth``; Linux). The plain variant's figures are the
  baseline of the ratios.

    python benchmarks/resnet12_cost.py            # several minutes on 2 CPU cores
    python benchmarks/resnet12_cost.py --quick    # smoke run, 1 repeat
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

from benchmarks.common import (  # noqa: E402
    PEAK_RSS_RESETTABLE, add_allow_dirty, machine, memory_probe_environment, peak_rss_growth, provenance, write_results,
)  # fmt: skip
from fewshot_nsl.config import RunConfig  # noqa: E402
from fewshot_nsl.episodes.episode import Episode  # noqa: E402
from fewshot_nsl.learners import build_learner  # noqa: E402
from fewshot_nsl.runtime import memory_format, seeded  # noqa: E402

WAYS, SHOTS, QUERIES, SIZE = 5, 5, 15, 84
VARIANTS = {
    "resnet12 (conv)": {"backbone": "resnet12"},
    "nsl-resnet12 static": {"backbone": "nsl-resnet12", "similarity": "static"},
    "nsl-resnet12 dynamic h16": {"backbone": "nsl-resnet12", "similarity": "dynamic", "nsl_hidden": 16},
    "nsl-resnet12 dynamic h64": {"backbone": "nsl-resnet12", "similarity": "dynamic", "nsl_hidden": 64},
}


def training_step(variant: str, seed: int):
    """A closure running one training episode of ``variant`` on fixed random images."""
    config = RunConfig(method="protonet", dataset="miniimagenet", ways=WAYS, shots=SHOTS, queries=QUERIES, seed=seed,
                       **VARIANTS[variant]).resolve()  # fmt: skip
    with seeded(seed):
        learner = build_learner(config, (3, SIZE, SIZE))
    layout = memory_format(bool(config.channels_last))
    learner.to(memory_format=layout).train()
    optimizer = torch.optim.Adam(learner.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(WAYS)

    def images(per_class: int) -> torch.Tensor:
        return torch.randn(WAYS * per_class, 3, SIZE, SIZE, generator=generator)

    episode = Episode(images(SHOTS), labels.repeat_interleave(SHOTS), images(QUERIES), labels.repeat_interleave(QUERIES), WAYS)
    episode = episode.to("cpu", layout)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        learner.backward_batch([episode])
        optimizer.step()

    return step, sum(p.numel() for p in learner.parameters())


def child(request: dict) -> dict:
    torch.set_num_threads(request["threads"])
    step, parameters = training_step(request["variant"], request["seed"])
    step()  # warm-up: oneDNN set-up, allocator growth
    if request["what"] == "memory":
        return {"bytes": peak_rss_growth(step), "parameters": parameters}
    times = []
    for _ in range(request["repeats"]):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return {"seconds": times, "parameters": parameters}


def in_fresh_process(request: dict, env: dict[str, str] | None = None) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(request)], capture_output=True, text=True,
                          check=True, env=env)  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="timed episodes per variant (default 3)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 repeat, the first two variants")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    add_allow_dirty(parser)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    origin = provenance(args.allow_dirty)
    variants = list(VARIANTS)[:2] if args.quick else list(VARIANTS)
    base = {"seed": args.seed, "threads": torch.get_num_threads(), "repeats": 1 if args.quick else args.repeats}
    rows = {}
    for variant in variants:
        timing = in_fresh_process({**base, "variant": variant, "what": "time"})
        memory = in_fresh_process({**base, "variant": variant, "what": "memory"}, memory_probe_environment()) if PEAK_RSS_RESETTABLE else None
        rows[variant] = {"seconds": statistics.median(timing["seconds"]), "all_seconds": timing["seconds"],
                         "peak_bytes": memory["bytes"] if memory else None, "parameters": timing["parameters"]}  # fmt: skip
        print(variant, rows[variant], flush=True)
    plain = rows[variants[0]]
    lines = [
        "# ResNet-12 on CPU: ProtoNet training episode cost\n",
        f"Command: `python benchmarks/resnet12_cost.py{' --quick' if args.quick else ''}`; {machine()['cpu_count']} CPU "
        f"cores, torch {torch.__version__}, {base['threads']} threads. One 5-way 5-shot 15-query episode of 84×84 "
        f"images (forward, backward, Adam), median of {base['repeats']} after a warm-up, each variant in a fresh "
        "process; peak memory is the growth of peak resident memory over one episode (glibc returning freed memory).\n",
        "| backbone | parameters | s / episode | × conv | episodes / hour | peak memory MiB | × conv |",
        "|---|---|---|---|---|---|---|",
    ]
    for variant, row in rows.items():
        memory = "—" if row["peak_bytes"] is None else f"{row['peak_bytes'] / 2**20:.0f}"
        memory_ratio = "—" if row["peak_bytes"] is None else f"{row['peak_bytes'] / plain['peak_bytes']:.2f}"
        lines.append(
            f"| {variant} | {row['parameters'] / 1e6:.2f}M | {row['seconds']:.2f} | {row['seconds'] / plain['seconds']:.2f} "
            f"| {3600 / row['seconds']:.0f} | {memory} | {memory_ratio} |"
        )
    lines.append(
        f"\nAt these speeds the shipped GPU recipe (configs/protonet-resnet12-miniimagenet.yaml, 40,000 episodes) "
        f"would take {40000 * plain['seconds'] / 3600:.0f} hours of this CPU with plain convolutions."
    )
    write_results("resnet12_cost", {"machine": machine(), "rows": rows, **base}, "\n".join(lines), origin)


if __name__ == "__main__":
    main()

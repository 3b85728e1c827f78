"""Mini-ImageNet data pipeline: decode and cached load, augmentation cost, one training episode broken down.

Measures, in one run on this machine:

* the first load of the three Ravi splits (decode every JPEG, resize when needed,
  write the uint8 cache) into an empty cache folder, then the cached load;
* training episodes/s of ProtoNet Conv-4 on 5-way 5-shot 15-query episodes, without
  and with augmentation (``fewshot_nsl.data.augment``), rounds interleaved, medians;
* where one training episode's time goes: sampling the indices, gathering and
  converting the images, augmentation, forward (loss), backward, optimiser step
  (medians over the timed episodes).

    python benchmarks/data_pipeline.py            # a few minutes on 2 cores
    python benchmarks/data_pipeline.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import add_allow_dirty, data_root, machine, provenance, write_results  # noqa: E402
from fewshot_nsl.config import RunConfig  # noqa: E402
from fewshot_nsl.data.augment import Augmentation  # noqa: E402
from fewshot_nsl.data.miniimagenet import SPLITS, load_miniimagenet  # noqa: E402
from fewshot_nsl.data.roots import cache_root  # noqa: E402
from fewshot_nsl.episodes.episode import materialise  # noqa: E402
from fewshot_nsl.episodes.sampler import EpisodeSampler  # noqa: E402
from fewshot_nsl.learners import build_learner  # noqa: E402
from fewshot_nsl.runtime import memory_format, seeded  # noqa: E402

WAYS, SHOTS, QUERIES = 5, 5, 15
STAGES = ("sample indices", "gather + to float", "augmentation", "forward (loss)", "backward", "optimiser step")


def load_times(root: Path, cache: Path) -> dict[str, float | int]:
    """Seconds to load all splits into the empty ``cache`` (decode), then again (cached); image count."""
    started = time.perf_counter()
    sets = [load_miniimagenet(root, split, cache) for split in SPLITS]
    first = time.perf_counter() - started
    started = time.perf_counter()
    for split in SPLITS:
        load_miniimagenet(root, split, cache)
    cached = time.perf_counter() - started
    return {"images": sum(len(s.images) for s in sets), "first_load_s": first, "cached_load_s": cached}


def timed(clock: dict[str, list[float]], stage: str, work: Callable[[], object]) -> object:
    started = time.perf_counter()
    out = work()
    clock[stage].append(time.perf_counter() - started)
    return out


def episode_breakdown(train_set, augment: bool, episodes: int, seed: int) -> dict[str, list[float]]:
    """Per-stage seconds of ``episodes`` ProtoNet training episodes (after two untimed ones)."""
    config = RunConfig(method="protonet", backbone="conv4", dataset="miniimagenet", seed=seed).resolve()
    with seeded(seed):
        learner = build_learner(config, train_set.image_shape)
    layout = memory_format(True)
    learner.to(memory_format=layout).train()
    optimizer = torch.optim.Adam(learner.parameters(), lr=1e-3)
    augmentation = Augmentation() if augment else None
    sampler = EpisodeSampler(
        train_set, WAYS, SHOTS, QUERIES, torch.Generator().manual_seed(seed),
        augmentation, torch.Generator().manual_seed(seed + 1) if augment else None,
    )  # fmt: skip
    clock: dict[str, list[float]] = {stage: [] for stage in (*STAGES, "total")}
    for index in range(episodes + 2):
        started = time.perf_counter()
        indices = timed(clock, "sample indices", sampler.sample_indices)
        plain = timed(clock, "gather + to float", lambda: materialise(train_set, indices))
        if augmentation is not None:
            generator = sampler.augmentation_generator
            timed(clock, "augmentation", lambda: materialise(train_set, indices, lambda x: augmentation(x, generator)))
        episode = plain.to("cpu", layout)
        optimizer.zero_grad(set_to_none=True)
        loss = timed(clock, "forward (loss)", lambda: learner.batch_loss([episode]).loss)
        timed(clock, "backward", loss.backward)
        timed(clock, "optimiser step", optimizer.step)
        clock["total"].append(time.perf_counter() - started)
        if index < 2:  # warm-up
            for times in clock.values():
                times.clear()
    return clock


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=20, help="timed episodes per round and setting (default 20)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 episodes, 1 round, no load timing")
    parser.add_argument("--seed", type=int, default=0)
    add_allow_dirty(parser)
    args = parser.parse_args()
    origin = provenance(args.allow_dirty)
    episodes, rounds = (2, 1) if args.quick else (args.episodes, args.rounds)
    root = Path(data_root())
    with tempfile.TemporaryDirectory() as empty_cache:
        loads = None if args.quick else load_times(root, Path(empty_cache))
        train_set = load_miniimagenet(root, "train", Path(empty_cache) if loads else cache_root())
    clocks: dict[bool, dict[str, list[float]]] = {False: {}, True: {}}
    for round_index in range(rounds):
        for augment in (False, True) if round_index % 2 == 0 else (True, False):
            for stage, times in episode_breakdown(train_set, augment, episodes, args.seed + round_index).items():
                clocks[augment].setdefault(stage, []).extend(times)
    medians = {augment: {stage: statistics.median(t) for stage, t in clock.items() if t} for augment, clock in clocks.items()}
    # The "total" of an augmented episode also runs the plain gather it is compared with; its training step
    # is the plain one's stages with the augmented gather in place of the plain gather.
    per_episode = {
        "plain": sum(medians[False][s] for s in STAGES if s in medians[False]),
        "augmented": sum(medians[True][s] for s in STAGES if s in medians[True] and s != "gather + to float"),
    }
    lines = [
        f"# Mini-ImageNet data pipeline\n\nCommand: `python benchmarks/data_pipeline.py{' --quick' if args.quick else ''}`, "
        f"{machine()['cpu_count']} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} threads. "
        f"ProtoNet Conv-4, {WAYS}-way {SHOTS}-shot {QUERIES}-query training episodes (100 images of 84×84), "
        f"channels_last; {rounds} interleaved rounds × {episodes} timed episodes per setting, medians.\n",
    ]
    if loads is not None:
        lines += [
            f"Loading the three splits ({loads['images']} images from {root / 'miniimagenet'}): first load "
            f"(decode, resize, write the uint8 cache) {loads['first_load_s']:.1f} s, cached load "
            f"{loads['cached_load_s']:.2f} s ({loads['first_load_s'] / loads['cached_load_s']:.0f}× faster).\n",
        ]
    lines += ["| stage | seconds, no augmentation | seconds, with augmentation |", "|---|---|---|"]
    for stage in STAGES:
        plain = medians[False].get(stage)
        augmented = medians[True].get("gather + to float" if stage == "gather + to float" else stage)
        if stage == "augmentation":
            plain = None
        lines.append(f"| {stage} | {'—' if plain is None else f'{plain:.4f}'} | {'—' if augmented is None else f'{augmented:.4f}'} |")
    lines += [
        f"| **one training episode** | **{per_episode['plain']:.4f}** | **{per_episode['augmented']:.4f}** |",
        "",
        f"Training episodes/s: {1 / per_episode['plain']:.2f} without augmentation, {1 / per_episode['augmented']:.2f} "
        f"with it ({per_episode['augmented'] / per_episode['plain']:.3f}× the time). The augmented row's gather "
        "and augmentation together replace the plain gather (the augmentation stage includes its own gather and "
        "conversion); the other stages are the same network work.",
    ]
    write_results(
        "data_pipeline",
        {"machine": machine(), "loads": loads, "medians": {str(k): v for k, v in medians.items()}, "per_episode": per_episode,
         "episodes": episodes, "rounds": rounds},  # fmt: skip
        "\n".join(lines),
        origin,
    )


if __name__ == "__main__":
    main()

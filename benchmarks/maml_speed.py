"""MAML speed: vectorised (vmap over tasks) vs sequential meta-batches, FLOP efficiency, memory.

Measures, in one run, at Finn et al.'s published task shapes:

* seconds per meta-batch (forward + meta-gradient into ``.grad`` through
  ``MAML.backward_batch``, which the trainer calls) for second- and
  first-order MAML, vectorised and sequential (each task backpropagated as
  soon as its loss is known), with their repeats interleaved (the order
  alternates every repeat) so that drifting machine load hits both alike;
  the medians and their ratio are reported;
* the FLOPs of one meta-batch (``torch.utils.flop_counter``: convolutions
  and matrix products, forward and backward) and the fraction of this
  machine's convolution peak each path achieves; the peak is measured in
  the same run as the best of a few large 64->64 3x3 convolutions;
* peak memory of one second-order meta-batch for meta-batch sizes 1, 8, 32.

Memory. Each measurement runs one untimed meta-batch first (one-off
costs such as oneDNN kernel set-up, some 200 MiB on CPU, would otherwise
dominate small settings), then measures a second one. On CUDA:
``torch.cuda.max_memory_allocated`` minus the memory allocated before the
meta-batch (tensors only; the caching allocator's reserve is not counted).
On CPU: every setting runs in a fresh subprocess, which resets the
kernel's peak-RSS counter (``/proc/self/clear_refs``), notes its resident
memory, runs the meta-batch and reads the peak (``VmHWM``); the growth is
reported. glibc's allocator would keep memory freed by the warm-up and
hide it from the second meta-batch, so the subprocess fixes its mmap and
trim thresholds (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``):
every large tensor is then mapped when allocated and returned when freed,
and the peak counts what the meta-batch itself holds at once (saved
activations, gradients, temporaries), to page granularity. Linux only;
elsewhere CPU memory is reported as unavailable.

Inputs are random tensors (this measures speed, not accuracy). Settings
follow Finn et al. 2017 (``fewshot_nsl.config.maml_recipe``), learned head:
Omniglot 5-way 1-shot, Finn et al.'s strided Conv-4 with 64 filters, meta-batch
32, 1 inner step, 1 query per class; Omniglot 20-way 1-shot, the same network,
meta-batch 16, 5 inner steps, 1 query per class; Mini-ImageNet 5-way 1-shot,
max-pooling Conv-4 with 32 filters, meta-batch 4, 5 inner steps, 15 queries per
class.

    python benchmarks/maml_speed.py              # full run (minutes on CPU)
    python benchmarks/maml_speed.py --quick      # smoke run of every code path
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import PEAK_RSS_RESETTABLE, memory_probe_environment, peak_rss_growth, provenance  # noqa: E402
from fewshot_nsl.backbones import build_backbone  # noqa: E402
from fewshot_nsl.episodes.episode import Episode  # noqa: E402
from fewshot_nsl.learners.maml import MAML  # noqa: E402

SHOTS = 1
MEMORY_META_BATCHES = (1, 8, 32)
MEMORY_SETTINGS = ("omniglot-5w1s", "omniglot-20w1s")
MODES = ("vectorised", "sequential")
ORDERS = ("second", "first")
RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Setting:
    """One benchmark configuration (1-shot)."""

    name: str
    image_shape: tuple[int, int, int]
    width: int
    ways: int
    queries: int
    meta_batch: int
    inner_steps: int
    inner_lr: float
    downsample: str  # Conv-4 network: Finn et al.'s strided Omniglot one, max-pooling on Mini-ImageNet


SETTINGS = {
    s.name: s
    for s in (
        Setting("omniglot-5w1s", (1, 28, 28), width=64, ways=5, queries=1, meta_batch=32, inner_steps=1, inner_lr=0.4,
                downsample="stride"),
        Setting("omniglot-20w1s", (1, 28, 28), width=64, ways=20, queries=1, meta_batch=16, inner_steps=5, inner_lr=0.1,
                downsample="stride"),
        Setting("miniimagenet-5w1s", (3, 84, 84), width=32, ways=5, queries=15, meta_batch=4, inner_steps=5, inner_lr=0.01,
                downsample="maxpool"),
    )
}


def quick(setting: Setting) -> Setting:
    """A few seconds' version of a setting: same image size, tiny network and meta-batch."""
    return replace(setting, width=8, meta_batch=2)


# ----- building blocks -----------------------------------------------------------------


def redraw_(module: nn.Module, generator: torch.Generator) -> nn.Module:
    """Weights from ``generator`` (uniform ±1/sqrt(fan_in)), so a run never depends on the global seed."""
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() > 1:
                bound = p[0].numel() ** -0.5
                p.copy_(torch.empty(p.shape, dtype=p.dtype).uniform_(-bound, bound, generator=generator))
    return module


def build(setting: Setting, first_order: bool, device: torch.device, seed: int) -> MAML:
    generator = torch.Generator().manual_seed(seed)
    backbone = build_backbone("conv4", setting.image_shape, width=setting.width, conv4_downsample=setting.downsample)
    redraw_(backbone, generator)
    learner = MAML(
        backbone, inner_lr=setting.inner_lr, inner_steps=setting.inner_steps, first_order=first_order,
        head="learned", ways=setting.ways, generator=generator,
    )  # fmt: skip
    return learner.to(device).train()


def random_episodes(setting: Setting, device: torch.device, seed: int) -> list[Episode]:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(setting.ways)

    def images(per_class: int) -> torch.Tensor:
        return torch.randn(setting.ways * per_class, *setting.image_shape, generator=generator)

    def episode() -> Episode:
        support, query = labels.repeat_interleave(SHOTS), labels.repeat_interleave(setting.queries)
        return Episode(images(SHOTS), support, images(setting.queries), query, setting.ways).to(device)

    return [episode() for _ in range(setting.meta_batch)]


def meta_batch_seconds(learner: MAML, episodes: list[Episode], device: torch.device) -> tuple[float, float]:
    """Wall and process-CPU seconds of one meta-batch: loss, meta-gradient, gradients cleared.

    CPU seconds are reported too because the cores may be shared: other
    processes inflate wall time, much less the CPU time this one uses.
    """
    synchronise(device)
    wall, cpu = time.perf_counter(), time.process_time()
    learner.backward_batch(episodes)
    synchronise(device)
    elapsed = time.perf_counter() - wall, time.process_time() - cpu
    learner.zero_grad(set_to_none=True)
    return elapsed


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----- timing --------------------------------------------------------------------------


def time_setting(setting: Setting, order: str, repeats: int, warmup: int, device: torch.device, seed: int) -> dict:
    """Interleaved repeats of both modes on the same learner and episodes; medians and ratio."""
    learner = build(setting, order == "first", device, seed)
    episodes = random_episodes(setting, device, seed + 1)
    flops = meta_batch_flops(learner, episodes)
    wall: dict[str, list[float]] = {mode: [] for mode in MODES}
    cpu: dict[str, list[float]] = {mode: [] for mode in MODES}
    for repeat in range(warmup + repeats):
        for mode in MODES if repeat % 2 == 0 else MODES[::-1]:
            learner.vectorise = mode == "vectorised"
            wall_s, cpu_s = meta_batch_seconds(learner, episodes, device)
            if repeat >= warmup:
                wall[mode].append(wall_s)
                cpu[mode].append(cpu_s)
    medians = {mode: statistics.median(t) for mode, t in wall.items()}
    cpu_medians = {mode: statistics.median(t) for mode, t in cpu.items()}
    return {
        "setting": setting.name,
        "order": order,
        "inner_steps": setting.inner_steps,
        "meta_batch": setting.meta_batch,
        "seconds": wall,
        "cpu_seconds": cpu,
        "median_s": medians,
        "median_cpu_s": cpu_medians,
        "vectorised_over_sequential": medians["vectorised"] / medians["sequential"],
        "vectorised_over_sequential_cpu": cpu_medians["vectorised"] / cpu_medians["sequential"],
        "flops": flops,
    }


def meta_batch_flops(learner: MAML, episodes: list[Episode]) -> int:
    """FLOPs of one meta-batch (sequential path; vmap computes the same products)."""
    learner.vectorise = False
    with FlopCounterMode(display=False) as counter:
        learner.backward_batch(episodes)
    learner.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def convolution_peak_flops(device: torch.device, repeats: int = 5) -> float:
    """FLOP/s of the best of a few large 64->64 3x3 convolutions: the machine's practical peak."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(256, 64, 28, 28, generator=generator).to(device)
    weight = torch.randn(64, 64, 3, 3, generator=generator).to(device)
    flops = 2 * images.shape[0] * 28 * 28 * 64 * 64 * 9
    best = float("inf")
    for _ in range(repeats + 1):
        synchronise(device)
        start = time.perf_counter()
        torch.nn.functional.conv2d(images, weight, padding=1)
        synchronise(device)
        best = min(best, time.perf_counter() - start)
    return flops / best


# ----- memory --------------------------------------------------------------------------


def memory_bytes(setting: Setting, mode: str, meta_batch: int, device: torch.device, seed: int) -> int | None:
    """Peak memory growth of one second-order meta-batch (see the module docstring for the method)."""
    if device.type == "cuda":
        return cuda_peak_bytes(replace(setting, meta_batch=meta_batch), mode, device, seed)
    if not PEAK_RSS_RESETTABLE:
        return None
    probe = {"setting": asdict(replace(setting, meta_batch=meta_batch)), "mode": mode, "seed": seed,
             "threads": torch.get_num_threads()}  # fmt: skip
    done = subprocess.run(
        [sys.executable, __file__, "--probe-memory", json.dumps(probe)],
        capture_output=True,
        text=True,
        check=True,
        env=memory_probe_environment(),
    )
    return json.loads(done.stdout.strip().splitlines()[-1])["bytes"]


def cuda_peak_bytes(setting: Setting, mode: str, device: torch.device, seed: int) -> int:
    learner = build(setting, False, device, seed)
    learner.vectorise = mode == "vectorised"
    episodes = random_episodes(setting, device, seed + 1)
    meta_batch_seconds(learner, episodes, device)  # warm-up
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    meta_batch_seconds(learner, episodes, device)
    return torch.cuda.max_memory_allocated(device) - before


def probe_cpu_memory(probe: dict) -> int:
    """Child process: RSS growth of one meta-batch after a warm-up one, from a reset peak counter."""
    torch.set_num_threads(probe["threads"])
    fields = probe["setting"]
    setting = Setting(**{**fields, "image_shape": tuple(fields["image_shape"])})
    device = torch.device("cpu")
    learner = build(setting, False, device, probe["seed"])
    learner.vectorise = probe["mode"] == "vectorised"
    episodes = random_episodes(setting, device, probe["seed"] + 1)
    meta_batch_seconds(learner, episodes, device)  # warm-up
    return peak_rss_growth(lambda: meta_batch_seconds(learner, episodes, device))


# ----- report --------------------------------------------------------------------------


def environment(device: torch.device) -> dict:
    """What the numbers depend on, including how busy the machine was (other processes share the cores)."""
    cpu = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_average_1min": os.getloadavg()[0],
    }


def memory_method(device: torch.device) -> str:
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated growth, after a warm-up meta-batch"
    return "peak RSS growth (VmHWM) of a fresh process, after a warm-up meta-batch"


def markdown(report: dict) -> str:
    env = report["environment"]
    title = "# MAML speed: vectorised vs sequential meta-batches"
    peak = report["convolution_peak_flops"]
    lines = [
        title + (" (QUICK smoke run, not a measurement)" if report["quick"] else ""),
        "",
        f"Commit {report['provenance']['commit']}{' (DIRTY tree)' if report['provenance']['dirty'] else ''}; "
        f"{env['device']}, torch {env['torch']}, {env['threads']} CPU thread(s), Conv-4 (fewshot_nsl.backbones), "
        f"learned head, 1-shot, random inputs; settings as `fewshot_nsl.config.maml_recipe` (Finn et al. 2017). "
        f"Medians of {report['repeats']} interleaved repeats after {report['warmup']} warm-up; "
        f"1-minute load average {env['load_average_1min']:.1f} at the start and "
        f"{report['load_average_1min_at_end']:.1f} at the end.",
        "",
        "Wall seconds per meta-batch (process CPU seconds in brackets), forward + meta-gradient. "
        "Speed-up = sequential ÷ vectorised wall time (above 1: vmap is faster). GFLOP: convolutions and matrix "
        f"products of one meta-batch, forward and backward; % peak: achieved FLOP/s over this machine's convolution "
        f"peak measured in the same run ({peak / 1e9:.0f} GFLOP/s, best 64->64 3x3 convolution on 256x64x28x28).",
        "",
        "| setting | ways | queries/class | order | inner steps | meta-batch | vectorised s | sequential s "
        "| speed-up | GFLOP | % peak vectorised | % peak sequential |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    settings = {s["name"]: s for s in report["settings"]}
    for row in report["timings"]:
        wall, cpu = row["median_s"], row["median_cpu_s"]
        setting = settings[row["setting"]]
        fraction = {mode: 100 * row["flops"] / wall[mode] / peak for mode in MODES}
        lines.append(
            f"| {row['setting']} | {setting['ways']} | {setting['queries']} | {row['order']} | {row['inner_steps']} | "
            f"{row['meta_batch']} | {wall['vectorised']:.3f} ({cpu['vectorised']:.3f}) | "
            f"{wall['sequential']:.3f} ({cpu['sequential']:.3f}) | "
            f"{1 / row['vectorised_over_sequential']:.2f} | {row['flops'] / 1e9:.1f} | "
            f"{fraction['vectorised']:.0f}% | {fraction['sequential']:.0f}% |"
        )
    if report["memory"]:
        lines += [
            "",
            f"Peak memory of one second-order meta-batch by meta-batch size, MiB ({report['memory_method']}). "
            "Sequential backpropagates each task as soon as its loss is known, so it should stay near one task's "
            "graph; vectorised holds the whole batched graph.",
            "",
        ]
        lines += memory_table(report["memory"])
    return "\n".join(lines) + "\n"


def memory_table(rows: list[dict]) -> list[str]:
    sizes = sorted({row["meta_batch"] for row in rows})
    lines = [
        "| setting | mode | " + " | ".join(f"meta-batch {n}" for n in sizes) + " |",
        "|---|---|" + "---|" * len(sizes),
    ]
    for setting, mode in dict.fromkeys((row["setting"], row["mode"]) for row in rows):
        cells = {row["meta_batch"]: row["bytes"] for row in rows if (row["setting"], row["mode"]) == (setting, mode)}
        mib = ["n/a" if cells[n] is None else f"{cells[n] / 2**20:.0f}" for n in sizes]
        lines.append(f"| {setting} | {mode} | " + " | ".join(mib) + " |")
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per mode (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed repeats per mode first (default 1)")
    parser.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--orders", nargs="+", choices=ORDERS, default=list(ORDERS))
    parser.add_argument("--memory-meta-batches", type=int, nargs="*", default=list(MEMORY_META_BATCHES),
                        help="meta-batch sizes whose peak memory is measured (default 1 8 32; none skips)")
    parser.add_argument("--memory-settings", nargs="*", choices=sorted(SETTINGS), default=list(MEMORY_SETTINGS),
                        help="settings whose memory is measured (default the Omniglot ones: Mini-ImageNet's "
                        "vectorised meta-batch of 32 would need tens of GiB)")
    parser.add_argument("--allow-dirty", action="store_true", help="write results from an uncommitted tree (marked so)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: width 8, meta-batch 2, 1 repeat, memory for meta-batch 1 and 2"
    )
    parser.add_argument("--probe-memory", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.warmup, args.memory_meta_batches = 1, 1, [1, 2]
    if args.repeats < 1 or args.warmup < 0 or any(n < 1 for n in args.memory_meta_batches):
        parser.error("--repeats must be >= 1, --warmup >= 0 and every --memory-meta-batches size >= 1")
    return args


def run_timings(settings: list[Setting], args: argparse.Namespace, device: torch.device) -> list[dict]:
    rows = []
    for setting in settings:
        for order in args.orders:
            row = time_setting(setting, order, args.repeats, args.warmup, device, args.seed)
            median = row["median_s"]
            print(
                f"{setting.name} {order}-order: vectorised {median['vectorised']:.3f}s, "
                f"sequential {median['sequential']:.3f}s, ratio {row['vectorised_over_sequential']:.2f} "
                f"(CPU-time ratio {row['vectorised_over_sequential_cpu']:.2f})",
                flush=True,
            )
            rows.append(row)
    return rows


def run_memory(settings: list[Setting], args: argparse.Namespace, device: torch.device) -> list[dict]:
    rows = []
    for setting in settings:
        if setting.name not in args.memory_settings:
            continue
        for mode in MODES:
            for size in args.memory_meta_batches:
                used = memory_bytes(setting, mode, size, device, args.seed)
                shown = "n/a" if used is None else f"{used / 2**20:.0f} MiB"
                print(f"{setting.name} {mode} meta-batch {size}: {shown}", flush=True)
                rows.append({"setting": setting.name, "mode": mode, "meta_batch": size, "bytes": used})
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.probe_memory:
        print(json.dumps({"bytes": probe_cpu_memory(json.loads(args.probe_memory))}))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    origin = provenance(args.allow_dirty or args.quick)
    settings = [quick(SETTINGS[name]) if args.quick else SETTINGS[name] for name in args.settings]
    env = environment(device)
    report = {
        "provenance": origin,
        "quick": args.quick,
        "convolution_peak_flops": convolution_peak_flops(device),
        "repeats": args.repeats,
        "warmup": args.warmup,
        "environment": env,
        "settings": [asdict(s) for s in settings],
        "timings": run_timings(settings, args, device),
        "memory_method": memory_method(device),
        "memory": run_memory(settings, args, device),
        "load_average_1min_at_end": os.getloadavg()[0],
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "maml_speed.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out_dir / "maml_speed.md").write_text(markdown(report))
    print(f"wrote {args.out_dir / 'maml_speed.json'} and {args.out_dir / 'maml_speed.md'}")


if __name__ == "__main__":
    main()

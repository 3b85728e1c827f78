"""Cost of one NSL layer: forward+backward, and forward alone, ÷ a plain 3×3 convolution, same process.

Where ``nsl_overhead.py`` times whole Conv-4 episodes, this isolates a single
layer at the shapes Conv-4 gives it (Omniglot 20w5s5q, 200 images: the stem on
1×28×28 images, the 64-channel layers at 14×14 and 7×7; Mini-ImageNet 5w5s15q,
100 images: the stem on 3×84×84, then 42×42 and 21×21), and splits dynamic NSL
into its two parts, so the report shows where the time goes:

* ``meta-network``: ``similarity(x)`` alone (patch energy, conv C→h, BatchNorm,
  ReLU, conv h→k² or k⁴);
* ``modulated conv, <path>``: the tap-modulated convolution with a fixed
  similarity (the part whose FLOPs equal the plain convolution's plus the
  modulation), on every implementation the layer's form has: the compiled
  kernels (``fused``), and the PyTorch ``patches`` and (diagonal) ``planes``
  paths.

Whole layers run their default path; ``<variant>, PyTorch path`` is the same
layer on its faster PyTorch implementation (what ran before the fused kernels).

Stems get no input gradient (their input is the images), like in training.
At the 14×14 and 42×42 shapes an operator profile (``torch.profiler``) of the
diagonal modulated convolution's training step on the PyTorch patch path
follows the table (the fused kernels are one opaque call to the profiler).

Each is timed twice: forward + backward (in training mode), and the forward
alone under ``no_grad`` in evaluation mode (the meta-network's BatchNorm on
running statistics), as evaluation runs it (runs 1–6 timed the forward alone
in training mode). Variants are timed alternately over several
rounds and medians compared. The FLOP ratios are the per-layer formulas of
``nsl_overhead.py``: training (forward + backward with input, weight and
similarity gradients) and forward, the floors for what is timed.

    python benchmarks/nsl_layer_overhead.py     # about six minutes on 2 cores
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from copy import deepcopy

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import add_allow_dirty, machine, provenance, write_results  # noqa: E402
from benchmarks.nsl_overhead import layer_multiply_adds, on_pytorch_path  # noqa: E402
from fewshot_nsl.backbones.similarity import Similarity  # noqa: E402
from fewshot_nsl.nsl import DynamicNSLConv2d  # noqa: E402
from fewshot_nsl.nsl.dynamic import CPU_CHUNK_ELEMENTS, _planes_modulated_conv, _TapModulatedConv  # noqa: E402
from fewshot_nsl.runtime import FAST_MALLOC, seeded  # noqa: E402

CHANNELS = 64
SHAPES = {"omniglot stem 1×28×28 ×200": (200, 28, 1), "omniglot 14×14 ×200": (200, 14, CHANNELS),
          "omniglot 7×7 ×200": (200, 7, CHANNELS), "mini stem 3×84×84 ×100": (100, 84, 3),
          "mini 42×42 ×100": (100, 42, CHANNELS), "mini 21×21 ×100": (100, 21, CHANNELS)}  # fmt: skip
VARIANTS = {
    "static-diagonal": Similarity("static", "diagonal"),
    "dynamic-diagonal-h16": Similarity("dynamic", "diagonal", 16),
    "dynamic-diagonal-h32": Similarity("dynamic", "diagonal", 32),
    "dynamic-diagonal-h64": Similarity("dynamic", "diagonal", 64),
    "dynamic-full-h64": Similarity("dynamic", "full", 64),
}


def forward_backward(forward: Callable[[], torch.Tensor], generator: torch.Generator) -> Callable[[], None]:
    """A step: ``forward()`` and its backward from a fixed dense random gradient.

    The gradient is laid out like the output, as BatchNorm's backward hands it
    to a layer in training; ``.sum().backward()`` would hand it a stride-0
    tensor, on which oneDNN's 1×1 convolution backward (the planes path) ran
    far slower in our trials than on a real gradient.
    """
    with torch.no_grad():
        upstream = torch.empty_like(forward()).normal_(generator=generator)

    def step() -> None:
        forward().backward(upstream)

    return step


def forward_only(forward: Callable[[], torch.Tensor]) -> Callable[[], None]:
    """A forward pass without autograd, as evaluation runs it."""

    def step() -> None:
        with torch.no_grad():
            forward()

    return step


def modulated_paths(layer: DynamicNSLConv2d) -> tuple[str, ...]:
    return ("fused", "patches", "planes") if layer.form == "diagonal" else ("fused", "patches")


def modulated_only(layer: DynamicNSLConv2d, x: torch.Tensor, path: str) -> Callable[[], torch.Tensor]:
    """The tap-modulated convolution with the layer's similarity precomputed (no meta-network)."""
    with torch.no_grad():
        sim = layer.similarity(x)
    if path == "planes":
        gain = sim.requires_grad_()
        return lambda: _planes_modulated_conv(x, layer.weight, gain, layer.stride, layer.padding)
    tap_last = (sim.permute(0, 2, 3, 1) if layer.form == "diagonal" else sim.permute(0, 3, 4, 1, 2)).requires_grad_()
    return lambda: _TapModulatedConv.apply(
        x, layer.weight, tap_last, layer.stride, layer.padding, True, CPU_CHUNK_ELEMENTS, path == "fused"
    )


def layer_forwards(plain: nn.Module, layers: dict[str, nn.Module], x: torch.Tensor) -> dict[str, Callable[[], torch.Tensor]]:
    """Every row's forward: the plain convolution, each layer, and for dynamic
    layers the same on the PyTorch path and their two halves."""
    forwards: dict[str, Callable[[], torch.Tensor]] = {"conv": lambda: plain(x)}
    for name, layer in layers.items():
        forwards[name] = lambda layer=layer: layer(x)
        if isinstance(layer, DynamicNSLConv2d):
            if layer.path != layer.pytorch_path:
                forwards[f"{name}{PYTORCH_SUFFIX}"] = lambda layer=on_pytorch_path(layer): layer(x)
            forwards[f"{name}: meta-network"] = lambda layer=layer: layer.similarity(x)
            for path in modulated_paths(layer):
                forwards[f"{name}: modulated conv, {path}"] = modulated_only(layer, x, path)
    return forwards


PYTORCH_SUFFIX = ", PyTorch path"
PROFILED_SHAPES = ("omniglot 14×14 ×200", "mini 42×42 ×100")
PROFILED_VARIANT = "dynamic-diagonal-h16: modulated conv, patches"
PROFILE_TOP = 8


def op_profile(step: Callable[[], None], repeats: int) -> list[tuple[str, float]]:
    """Milliseconds per step by operator (self CPU time, torch.profiler), the largest first."""
    step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        for _ in range(repeats):
            step()
    totals = [(event.key, event.self_cpu_time_total / 1000 / repeats) for event in profiler.key_averages()]
    return sorted(totals, key=lambda item: -item[1])


def profile_lines(shape: str, profile: list[tuple[str, float]], plain: list[tuple[str, float]]) -> list[str]:
    total, plain_total = sum(ms for _, ms in profile), sum(ms for _, ms in plain)
    lines = [f"**{shape}**, {PROFILED_VARIANT} {total:.1f} ms against plain conv {plain_total:.1f} ms "
             f"(profiled, so slower than the timings above):", "", "| operator | ms per step | share |", "|---|---|---|"]  # fmt: skip
    lines += [f"| `{name}` | {ms:.1f} | {100 * ms / total:.0f}% |" for name, ms in profile[:PROFILE_TOP]]
    rest = sum(ms for _, ms in profile[PROFILE_TOP:])
    return lines + [f"| everything else | {rest:.1f} | {100 * rest / total:.0f}% |", ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    add_allow_dirty(parser)
    args = parser.parse_args()
    origin = provenance(args.allow_dirty or getattr(args, "quick", False))
    rows = []
    profiles: list[str] = []
    for shape_name, (batch, side, in_channels) in SHAPES.items():
        stem = in_channels != CHANNELS
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(batch, in_channels, side, side, generator=generator).to(memory_format=torch.channels_last)
        x.requires_grad_(not stem)
        with seeded(0):
            plain = nn.Conv2d(in_channels, CHANNELS, 3, 1, 1, bias=False).to(memory_format=torch.channels_last)
            layers = {name: sim.conv3x3(in_channels, CHANNELS).to(memory_format=torch.channels_last)
                      for name, sim in VARIANTS.items()}  # fmt: skip
        forwards = layer_forwards(plain, layers, x)
        # The forward alone as evaluation runs it: BatchNorm (the meta-network's) on running statistics.
        evaluations = layer_forwards(plain, {name: deepcopy(layer).eval() for name, layer in layers.items()}, x)
        steps = {name: forward_backward(forward, generator) for name, forward in forwards.items()}
        steps |= {f"{name} [fwd]": forward_only(forward) for name, forward in evaluations.items()}
        times: dict[str, list[float]] = {name: [] for name in steps}
        for step in steps.values():  # warm-up
            step()
        for _ in range(args.rounds):
            for name, step in steps.items():
                start = time.perf_counter()
                for _ in range(args.repeats):
                    step()
                times[name].append((time.perf_counter() - start) / args.repeats)
        if shape_name in PROFILED_SHAPES:
            profiles += profile_lines(
                shape_name, op_profile(steps[PROFILED_VARIANT], args.repeats), op_profile(steps["conv"], args.repeats)
            )
        for name in forwards:
            variant = VARIANTS.get(name.split(":")[0].removesuffix(PYTORCH_SUFFIX), Similarity("conv"))
            positions = batch * side * side
            whole_layer = ":" not in name
            row: dict[str, object] = {"shape": shape_name, "variant": name}
            for phase, key, training in (("train", name, True), ("fwd", f"{name} [fwd]", False)):
                plain_macs, extra = layer_multiply_adds(
                    variant, in_channels, CHANNELS, positions, training=training, input_grad=not stem
                )
                seconds = statistics.median(times[key])
                base = statistics.median(times["conv" if phase == "train" else "conv [fwd]"])
                row |= {f"{phase}_ms": 1000 * seconds, f"{phase}_ratio": seconds / base,
                        f"{phase}_flop_ratio": (plain_macs + extra) / plain_macs if whole_layer else None}  # fmt: skip
            rows.append(row)
    lines = [
        "| layer input | variant | fwd+bwd ms | ÷ plain conv | training FLOP ratio | ratio ÷ FLOP ratio "
        "| fwd ms | ÷ plain conv | forward FLOP ratio | ratio ÷ FLOP ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [r["shape"], r["variant"]]
        for phase in ("train", "fwd"):
            flop = r[f"{phase}_flop_ratio"]
            cells += [f"{r[f'{phase}_ms']:.1f}", f"{r[f'{phase}_ratio']:.2f}×", f"{flop:.2f}×" if flop else "",
                      f"{r[f'{phase}_ratio'] / flop:.2f}" if flop else ""]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    info = machine()
    text = (
        "# NSL per-layer overhead, 3×3 layers of Conv-4, CPU\n\n"
        f"`python benchmarks/nsl_layer_overhead.py` — {args.rounds} alternating rounds × {args.repeats} repeats, "
        f"medians; {info['cpu_count']} cores, {info['threads']} threads, torch {info['torch']}, channels_last, "
        f"GLIBC_TUNABLES {'set' if info['glibc_tunables'] == FAST_MALLOC else 'not set'}. Forward + backward "
        "(input gradient except for stems, weight and similarity gradients), and the forward alone under `no_grad` "
        "in evaluation mode (the meta-network's BatchNorm on running statistics), "
        "against `nn.Conv2d` in the same run; the FLOP ratios are the corrected floors of `nsl_overhead.py`. Whole "
        f"dynamic layers take their default path (the fused kernels, planes on 1-channel stems); `{PYTORCH_SUFFIX}` is "
        "the same layer on its PyTorch implementation (the state before the kernels). The `meta-network` and "
        "`modulated conv` rows split the dynamic layer into its two halves, the latter on each implementation.\n\n"
        + "\n".join(lines) + "\n\n"
        "## Where the PyTorch patch path's time goes\n\nOperators of one forward + backward step of the "
        "64→64 tap-modulated convolution (diagonal, fixed similarity) on the patch path, by self CPU time.\n\n"
        + "\n".join(profiles)
    )
    write_results("nsl_layer_overhead", {"machine": info, "rounds": args.rounds, "repeats": args.repeats, "rows": rows}, text, origin)


if __name__ == "__main__":
    main()

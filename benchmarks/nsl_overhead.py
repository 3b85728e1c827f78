"""Cost of neural similarity: NSL ÷ plain convolution, same Conv-4, same process.

For each input size (Omniglot 20-way 5-shot 5-query: 200×1×28×28; Mini-ImageNet
5-way 5-shot 15-query: 100×3×84×84) it times the forward+backward of a ProtoNet
training episode and the forward of an evaluation pass (static NSL folded into
plain convolutions, as ``fewshot-nsl eval`` does), for plain Conv-4, static NSL
(diagonal, full) and dynamic NSL (diagonal with meta-network width h ∈ {16, 32,
64}, full with h = 64). Timings are paired: every variant (plain Conv-4 itself
included, as a check of the pairing's noise) is timed right after plain
Conv-4, in an order shuffled each round by a seeded generator, and its ratio
is the median of its per-pair ratios. Drift in the machine's speed and a
variant's place in the round then hit both sides of each ratio alike; with
medians of separately timed rounds, the evaluation of static NSL (the very
network of plain Conv-4 once folded) read 0.90× at code 54aa99a.

Dynamic NSL has a FLOP floor of its own: per 3×3 layer with C inputs, O outputs
and an Ho×Wo output grid, the main convolution costs F = Ho·Wo·O·C·9 multiply-adds;
the meta-network adds Ho·Wo·h·C·9 (first conv) + Ho·Wo·T·h·9 (second conv, T = 9
diagonal or 81 full), and applying M costs Ho·Wo·C·9 (diagonal) or Ho·Wo·C·81
(full). The *forward* FLOP ratio sums these over the four layers; it is the floor
for evaluation. Training also runs the backward, where every convolution is paid
again for its weight gradient and, except on the images, for its input gradient.
Dynamic NSL's backward needs G[p,c,t] = sum_o dL/dy[p,o] · w[o,c,t], which is
the input gradient's own contraction (dX = col2im(G ⊙ m)): where the layer has
an input gradient, the similarity gradient dL/dm[p,t] = sum_c G[p,c,t] ·
x[p+δ_t,c] is elementwise work given G (Ho·Wo·C·9 diagonal, Ho·Wo·C·81 full),
and so is G ⊙ m; only a layer without an input gradient (the stem) pays a
convolution-sized contraction (F) to form G. The *training* FLOP ratio counts

    per layer: conv · (2 + input_grad)                      plain convolution
             + meta_first · (2 + input_grad) + meta_second · 3   meta-network
             + modulation · (2 + input_grad)                 m ⊙ patches, G·x, G ⊙ m
             + conv · (1 − input_grad)                       G, stem only

and is the floor for a training episode; both ratios are reported. (A patch
recomputation or any other implementation choice is not part of the floor.)

    python benchmarks/nsl_overhead.py            # a few minutes on 2 cores
    python benchmarks/nsl_overhead.py --quick
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from copy import deepcopy
from typing import TypeVar

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import add_allow_dirty, machine, provenance, write_results  # noqa: E402
from fewshot_nsl.backbones import build_backbone  # noqa: E402
from fewshot_nsl.backbones.similarity import Similarity  # noqa: E402
from fewshot_nsl.episodes.episode import Episode  # noqa: E402
from fewshot_nsl.learners import ProtoNet  # noqa: E402
from fewshot_nsl.nsl import fold_static_nsl, use_pytorch_path  # noqa: E402
from fewshot_nsl.runtime import FAST_MALLOC, seeded  # noqa: E402

INPUTS = {"omniglot-20w5s5q": ((1, 28, 28), 20, 5, 5), "miniimagenet-5w5s15q": ((3, 84, 84), 5, 5, 15)}
VARIANTS = {
    "conv": Similarity("conv"),
    "static-diagonal": Similarity("static", "diagonal"),
    "static-full": Similarity("static", "full"),
    "dynamic-diagonal-h16": Similarity("dynamic", "diagonal", 16),
    "dynamic-diagonal-h32": Similarity("dynamic", "diagonal", 32),
    "dynamic-diagonal-h64": Similarity("dynamic", "diagonal", 64),
    "dynamic-full-h64": Similarity("dynamic", "full", 64),
}
DYNAMIC_VARIANTS = {name: similarity for name, similarity in VARIANTS.items() if similarity.kind == "dynamic"}
# Dynamic layers run the fused kernels by default; this suffix marks the same
# learner with every dynamic layer on its PyTorch path (the "before").
PYTORCH_SUFFIX = ", PyTorch path"
WIDTH = 64
ModelT = TypeVar("ModelT", bound=torch.nn.Module)


def on_pytorch_path(model: ModelT) -> ModelT:
    """A copy of ``model`` whose dynamic layers all take their PyTorch path
    (``DynamicNSLConv2d.pytorch_path``: planes on diagonal stems, patches elsewhere)."""
    return use_pytorch_path(deepcopy(model))


def layer_multiply_adds(
    similarity: Similarity, in_channels: int, out_channels: int, positions: int,
    training: bool = False, input_grad: bool = True,
) -> tuple[int, int]:
    """(plain convolution, NSL extra) multiply-adds of one 3×3 layer over ``positions`` outputs.

    Forward only, or with ``training`` forward + backward (docstring formula):
    ``input_grad`` is false for the first layer, whose input (the images) needs
    no gradient.
    """
    conv = positions * out_channels * in_channels * 9
    passes = 2 + input_grad if training else 1  # forward, weight gradient, input gradient
    if similarity.kind != "dynamic":
        return conv * passes, 0
    taps = 9 if similarity.form == "diagonal" else 81
    hidden = similarity.hidden
    meta_first = positions * hidden * in_channels * 9
    meta_second = positions * taps * hidden * 9
    modulation = positions * in_channels * taps
    if not training:
        return conv, meta_first + meta_second + modulation
    # Backward extras (module docstring): the meta-network's gradients (its hidden activations
    # always need an input gradient), the similarity gradient and G ⊙ m as elementwise work given
    # G, and G itself only where no input gradient computes it anyway (the stem).
    extra = meta_first * passes + meta_second * 3 + modulation * (2 + input_grad)
    return conv * passes, extra + (0 if input_grad else conv)


def flop_ratio(similarity: Similarity, image_shape: tuple[int, int, int], training: bool = False) -> float:
    """Multiply-adds of the NSL Conv-4's 3×3 layers ÷ those of the plain Conv-4."""
    channels, height, width = image_shape
    plain = extra = 0
    for layer in range(4):
        layer_plain, layer_extra = layer_multiply_adds(
            similarity, channels, WIDTH, height * width, training=training, input_grad=layer > 0
        )
        plain, extra = plain + layer_plain, extra + layer_extra
        channels, height, width = WIDTH, height // 2, width // 2
    return (plain + extra) / plain


def synthetic_episode(image_shape, ways, shots, queries, layout) -> Episode:
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(ways)
    return Episode(
        torch.randn(ways * shots, *image_shape, generator=generator).to(memory_format=layout),
        labels.repeat_interleave(shots),
        torch.randn(ways * queries, *image_shape, generator=generator).to(memory_format=layout),
        labels.repeat_interleave(queries),
        ways,
    )


def timed(fn, repeats: int) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=3)
    add_allow_dirty(parser)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    origin = provenance(args.allow_dirty or getattr(args, "quick", False))
    rounds, repeats = (1, 1) if args.quick else (args.rounds, args.repeats)
    layout = torch.channels_last  # the shipped default for ProtoNet on CPU
    rows = []
    for input_name, (shape, ways, shots, queries) in INPUTS.items():
        episode = synthetic_episode(shape, ways, shots, queries, layout)
        learners = {}
        for name, similarity in VARIANTS.items():
            with seeded(0):
                backbone = build_backbone("conv4" if similarity.kind == "conv" else "nsl-conv4", shape, similarity)
            learners[name] = ProtoNet(backbone).to(memory_format=layout)
        for name, similarity in DYNAMIC_VARIANTS.items():  # the same weights on the PyTorch path: before/after
            learners[f"{name}{PYTORCH_SUFFIX}"] = on_pytorch_path(learners[name])
        evaluators = {name: fold_static_nsl(learner).eval() for name, learner in learners.items()}

        def train_step(learner: ProtoNet) -> None:
            learner.zero_grad(set_to_none=True)
            learner.batch_loss([episode]).loss.backward()

        @torch.no_grad()
        def eval_step(learner: ProtoNet) -> None:
            learner.fit(episode.support_images, episode.support_labels, ways)(episode.query_images)

        for name in learners:  # warm-up
            train_step(learners[name])
            eval_step(evaluators[name])
        phases = {"train": (train_step, learners), "eval": (eval_step, evaluators)}
        times = {phase: {name: [] for name in learners} for phase in phases}
        ratios = {phase: {name: [] for name in learners} for phase in phases}
        names = list(learners)
        order = torch.Generator().manual_seed(0)
        for _ in range(rounds):
            for index in torch.randperm(len(names), generator=order).tolist():
                name = names[index]
                for phase, (step, models) in phases.items():
                    base = timed(lambda: step(models["conv"]), repeats)
                    own = timed(lambda: step(models[name]), repeats)
                    times[phase][name].append(own)
                    ratios[phase][name].append(own / base)
        for name in learners:
            similarity = VARIANTS[name.removesuffix(PYTORCH_SUFFIX)]
            forward_flops, training_flops = flop_ratio(similarity, shape), flop_ratio(similarity, shape, training=True)
            rows.append({
                "input": input_name, "variant": name,
                "train_s": statistics.median(times["train"][name]), "eval_s": statistics.median(times["eval"][name]),
                "train_ratio": statistics.median(ratios["train"][name]),
                "eval_ratio": statistics.median(ratios["eval"][name]),
                "forward_flop_ratio": forward_flops, "training_flop_ratio": training_flops,
            })  # fmt: skip
    lines = [
        "| input | variant | train s/episode | train ratio | training FLOP ratio | train ÷ training FLOPs "
        "| eval ratio | forward FLOP ratio | eval ÷ forward FLOPs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['input']} | {r['variant']} | {r['train_s']:.3f} | {r['train_ratio']:.2f}× | "
            f"{r['training_flop_ratio']:.2f}× | {r['train_ratio'] / r['training_flop_ratio']:.2f} | "
            f"{r['eval_ratio']:.2f}× | {r['forward_flop_ratio']:.2f}× | {r['eval_ratio'] / r['forward_flop_ratio']:.2f} |"
        )
    info = machine()
    text = (
        "# NSL overhead, Conv-4, CPU\n\n"
        f"`python benchmarks/nsl_overhead.py` — {rounds} rounds of paired timings (each variant right after plain "
        f"Conv-4, seeded shuffled order) × {repeats} repeats; ratios are medians of the per-pair ratios; "
        f"{info['cpu_count']} cores, {info['threads']} threads, torch {info['torch']}, channels_last, "
        f"GLIBC_TUNABLES {'set' if info['glibc_tunables'] == FAST_MALLOC else 'not set'}. Ratios are against plain Conv-4 "
        "in the same run. Training = ProtoNet episode forward+backward; evaluation = forward with static NSL folded. "
        "FLOP ratios count the four 3×3 layers (forward, or forward + backward: see the script's docstring). "
        f"Dynamic layers take their default path (the fused kernels where they apply); rows marked `{PYTORCH_SUFFIX}` "
        "run the same learner with every dynamic layer on its PyTorch path (planes on diagonal stems, patches "
        "elsewhere, and the meta-network in PyTorch ops).\n\n"
        + "\n".join(lines) + "\n"
    )
    write_results("nsl_overhead", {"machine": info, "rounds": rounds, "repeats": repeats, "rows": rows}, text, origin)


if __name__ == "__main__":
    main()

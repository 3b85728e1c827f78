"""``fewshot-nsl nads``: neural anisotropy directions of a backbone at initialisation (gradient covariance method)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from fewshot_nsl.analysis import check_out_folder
from fewshot_nsl.analysis.nads import (
    ScalarReadout,
    anisotropy_directions,
    dct_direction,
    evaluation_point,
    input_gradients,
    SeparabilityRecipe,
    separability,
    write_report,
    write_separability,
)
from fewshot_nsl.backbones import BACKBONES, build_backbone, resolve_similarity
from fewshot_nsl.backbones.similarity import FORMS, KINDS, Similarity
from fewshot_nsl.errors import UserError
from fewshot_nsl.runtime import seeded


# SeparabilityRecipe fields the command exposes (the paper's values by default; smaller ones for a quick look).
SEPARABILITY_FLAGS = (
    ("epsilon", float, "signal: x = ε·y·v + noise"),
    ("noise", float, "std of the Gaussian noise orthogonal to v"),
    ("train_samples", int, "training samples per direction"),
    ("test_samples", int, "test samples per direction"),
    ("epochs", int, "SGD epochs (batches of 128, learning rate 0.5 decayed linearly to 0, gradient norm clipped at 0.5)"),
)


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("nads", help="neural anisotropy directions of a backbone", description=__doc__)
    parser.add_argument("--backbone", choices=BACKBONES, default="conv4")
    parser.add_argument("--similarity", choices=KINDS[1:], help="NSL kind for nsl-* backbones (default static)")
    parser.add_argument("--nsl-form", choices=FORMS, default="diagonal")
    parser.add_argument("--nsl-hidden", type=int, default=64)
    parser.add_argument("--input-size", type=int, default=28, help="image side (default 28; 84 for Mini-ImageNet)")
    parser.add_argument("--channels", type=int, default=1, help="input channels (default 1; 3 for RGB: one covariance per channel)")
    parser.add_argument("--samples", type=int, default=512, help="random initialisations averaged over (default 512)")
    parser.add_argument("--top", type=int, default=16, help="leading directions drawn (default 16)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="folder for nads.png, spectrum.csv, spectrum.png")
    parser.add_argument("--separability", action="store_true",
                        help="also run the directional separability test over a grid of 2-D DCT directions "
                        "(separability.csv / .png, with a linear model as the control)")  # fmt: skip
    parser.add_argument("--frequency-step", type=int, default=4, help="separability: DCT frequencies 0, K, 2K, ... per axis (default 4)")
    paper = SeparabilityRecipe()
    for flag, kind, meaning in SEPARABILITY_FLAGS:
        parser.add_argument(f"--{flag.replace('_', '-')}", type=kind, default=getattr(paper, flag),
                            help=f"separability: {meaning} (default {getattr(paper, flag)}, the paper's)")  # fmt: skip
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> None:
    """Every input is checked before the first initialisation: the computation takes minutes."""
    if args.samples < 2 or args.input_size < 4 or args.channels < 1 or args.top < 1:
        raise UserError("--samples must be >= 2, --input-size >= 4, --channels and --top >= 1")
    if args.separability:
        if args.frequency_step < 1:
            raise UserError("--frequency-step must be >= 1")
        recipe = SeparabilityRecipe(**{flag: getattr(args, flag) for flag, _, _ in SEPARABILITY_FLAGS})
        recipe.check()
    check_out_folder(args.out)
    similarity = resolve_similarity(args.backbone, args.similarity, args.nsl_form, args.nsl_hidden)
    shape = (args.channels, args.input_size, args.input_size)
    _check_input_size(args.backbone, shape, similarity)

    def build(generator: torch.Generator) -> ScalarReadout:
        # Layer constructors draw from the default generator: seed it from this initialisation's own.
        with seeded(int(torch.randint(2**62, (1,), generator=generator))):
            backbone = build_backbone(args.backbone, shape, similarity=similarity, generator=generator)
        return ScalarReadout(backbone, backbone.out_features, generator)

    gradients = input_gradients(build, evaluation_point(*shape[:2], seed=args.seed), args.samples, args.seed)
    nads = anisotropy_directions(gradients)
    write_report(nads, args.out, args.top)
    if args.separability:
        frequencies = range(0, args.input_size, args.frequency_step)
        directions = {(r, c): dct_direction(args.input_size, r, c) for r in frequencies for c in frequencies}
        network = separability(build, directions, args.channels, args.seed, recipe)
        flat = args.channels * args.input_size**2
        # The control shows each task is solvable: a linear model trained by the same recipe.
        control = separability(lambda g: ScalarReadout(nn.Flatten(), flat, g), directions, args.channels, args.seed, recipe)
        write_separability(network, control, args.out)
    print(f"{args.backbone} ({similarity.label}), {args.samples} initialisations: NADs in {args.out}")


def _check_input_size(backbone: str, shape: tuple[int, int, int], similarity: Similarity) -> None:
    """A backbone whose pooling leaves no pixel of ``shape`` is refused, naming this command's flag
    (the backbone's own message names training's --image-size)."""
    try:
        build_backbone(backbone, shape, similarity=similarity)
    except UserError:
        raise UserError(f"--input-size {shape[-1]} is too small for {backbone}'s pooling; give a larger --input-size, e.g. 28") from None

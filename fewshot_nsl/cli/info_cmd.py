"""``fewshot-nsl info``: parameter counts of backbone variants."""

from __future__ import annotations

import argparse

from fewshot_nsl.backbones import BACKBONES, build_backbone, parameter_count, resolve_similarity
from fewshot_nsl.backbones.similarity import FORMS, KINDS
from fewshot_nsl.data.registry import dataset_spec


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("info", help="parameter counts of backbones", description=__doc__)
    parser.add_argument("--backbone", choices=BACKBONES, nargs="+", default=list(BACKBONES), help="backbones (default all)")
    parser.add_argument("--similarity", choices=KINDS[1:], nargs="+", help="NSL kinds for nsl-* (default static and dynamic)")
    parser.add_argument("--nsl-form", choices=FORMS, nargs="+", default=list(FORMS), help="NSL forms (default both)")
    parser.add_argument("--nsl-hidden", type=int, default=64, help="dynamic meta-network width (default 64)")
    parser.add_argument("--width", type=int, default=64, help="Conv-4 filters (default 64)")
    parser.add_argument("--dataset", default="omniglot", help="input size of this dataset (default omniglot)")
    parser.set_defaults(handler=handle)


def variants(args: argparse.Namespace) -> list[tuple[str, str | None, str]]:
    rows: list[tuple[str, str | None, str]] = []
    for backbone in args.backbone:
        if not backbone.startswith("nsl-"):
            rows.append((backbone, None, "diagonal"))
            continue
        rows += [(backbone, kind, form) for kind in (args.similarity or KINDS[1:]) for form in args.nsl_form]
    return rows


def handle(args: argparse.Namespace) -> None:
    spec = dataset_spec(args.dataset)
    channels = 1 if args.dataset == "omniglot" else 3
    shape = (channels, spec.image_size, spec.image_size)
    print(f"{'backbone':<14} {'similarity':<18} {'parameters':>12} {'features':>9}   (input {shape})")
    for backbone, kind, form in variants(args):
        similarity = resolve_similarity(backbone, kind, form, args.nsl_hidden)
        model = build_backbone(backbone, shape, similarity=similarity, width=args.width)
        print(f"{backbone:<14} {similarity.label:<18} {parameter_count(model):>12,} {model.out_features:>9}")

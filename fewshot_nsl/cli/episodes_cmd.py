"""``fewshot-nsl episodes make|verify``: regenerate or check the fixed evaluation manifests."""

from __future__ import annotations

import argparse
from pathlib import Path

from fewshot_nsl.data.registry import load_split
from fewshot_nsl.episodes.manifest import STANDARD_SPECS, draw, episodes_dir, save_standard, stored_manifest
from fewshot_nsl.errors import UserError


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("episodes", help="make or verify the fixed evaluation episodes", description=__doc__)
    parser.add_argument("action", choices=("make", "verify"), help="make: draw the standard manifests; verify: check them")
    parser.add_argument("--dataset", help="only manifests of this dataset (omniglot, miniimagenet)")
    parser.add_argument("--data-root", help="folder holding the datasets (default $FEWSHOT_NSL_DATA)")
    parser.add_argument("--dir", type=Path, help="manifest folder (default: the repository's episodes/)")
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> None:
    folder = args.dir or episodes_dir()
    specs = [s for s in STANDARD_SPECS if args.dataset in (None, s.dataset)]
    if not specs:
        raise UserError(f"no standard manifests for dataset {args.dataset!r}")
    failures = 0
    for spec in specs:
        split = load_split(spec.dataset, spec.split, spec.protocol, args.data_root)
        redrawn = draw(spec, split)
        if args.action == "make":
            path = save_standard(redrawn, folder)
            print(f"wrote {path} #{redrawn.content_hash()}")
            continue
        try:
            stored = stored_manifest(spec, split, folder)  # raises if a file or pin no longer matches its hash
        except UserError as error:
            print(f"DIFFERS {spec.name}: {error}")
            failures += 1
            continue
        if stored is None:
            print(f"MISSING {spec.name}")
            failures += 1
            continue
        same = stored.content_hash() == redrawn.content_hash()
        failures += not same
        print(f"{'ok' if same else 'DIFFERS'} {spec.name} #{stored.content_hash()}" + ("" if same else f" (redrawn #{redrawn.content_hash()})"))
    if failures:
        raise UserError(f"{failures} manifest(s) missing or different from a fresh draw; run `fewshot-nsl episodes make`")

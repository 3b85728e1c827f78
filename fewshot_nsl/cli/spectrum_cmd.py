"""``fewshot-nsl spectrum RUN_DIR [RUN_DIR ...]``: singular-value spectra of trained backbones' layers, compared."""

from __future__ import annotations

import argparse
from pathlib import Path

from fewshot_nsl.analysis import check_out_folder
from fewshot_nsl.analysis.spectrum import singular_values, write_spectra
from fewshot_nsl.api import load_trained
from fewshot_nsl.errors import UserError


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "spectrum", help="singular-value spectra of runs' layers and their pairwise distances", description=__doc__
    )
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="trained run directories (one architecture)")
    parser.add_argument("--checkpoint", choices=("best", "last"), default="best")
    parser.add_argument("--out", type=Path, required=True, help="folder for spectra.csv, distances.csv, spectra.png")
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> None:
    labels = [str(path) for path in args.run_dirs]
    if len(set(labels)) != len(labels):
        raise UserError("a run directory is given twice; name each run once")
    check_out_folder(args.out)
    spectra = {
        label: singular_values(load_trained(path, args.checkpoint, device="cpu").learner.backbone)
        for label, path in zip(labels, args.run_dirs)
    }
    distances = write_spectra(spectra, args.out)
    print(distances.round(4).to_string())
    print(f"spectra of {len(spectra)} run(s) in {args.out}: spectra.csv, distances.csv, spectra.png")

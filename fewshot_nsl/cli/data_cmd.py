"""``fewshot-nsl data prepare``: download/convert a dataset into the data root."""

from __future__ import annotations

import argparse
from pathlib import Path

from fewshot_nsl.data.miniimagenet import prepare_miniimagenet
from fewshot_nsl.data.miniimagenet_download import ACCEPTED, download_miniimagenet, has_every_split
from fewshot_nsl.data.omniglot_prepare import has_npz_form, prepare_omniglot
from fewshot_nsl.data.roots import data_root
from fewshot_nsl.errors import UserError


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("data", help="prepare datasets", description=__doc__)
    parser.add_argument("action", choices=("prepare",), help="prepare: download and convert, or check and link --source")
    parser.add_argument("dataset", choices=("omniglot", "miniimagenet"), help="which dataset")
    parser.add_argument("--data-root", help="target folder (default $FEWSHOT_NSL_DATA or ~/.cache/fewshot-nsl/data)")
    parser.add_argument("--source", type=Path, help="your copy instead of downloading: Mini-ImageNet split folders, images/ + CSVs, "
                        "or the pickle caches; Omniglot's PNG tree (images_background/, images_evaluation/) or its zips")
    parser.add_argument("--splits-from", type=Path, help="Omniglot: folder with the Vinyals split .txt files (when offline)")
    parser.add_argument("--no-download", action="store_true", help="only use files already present")
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> None:
    root = data_root(args.data_root)
    if args.dataset == "omniglot":
        if args.source is not None and has_npz_form(root / "omniglot"):
            raise UserError(f"Omniglot is already prepared in {root / 'omniglot'}, so --source would not be read: drop it, "
                            "or move that folder aside to convert your copy")  # fmt: skip
        folder = prepare_omniglot(root, download=not args.no_download, png_root=args.source, splits_from=args.splits_from)
    else:
        if args.splits_from is not None:
            raise UserError("--splits-from is Omniglot's (the Vinyals split files); Mini-ImageNet's splits come with it: drop it")
        if args.source is not None:
            folder = prepare_miniimagenet(args.source, root)
        elif args.no_download:
            if not has_every_split(root / "miniimagenet"):
                raise UserError(f"no Mini-ImageNet in {root / 'miniimagenet'} and --no-download; accepted formats: {ACCEPTED}")
            folder = root / "miniimagenet"
        else:
            folder = download_miniimagenet(root)
    print(f"{args.dataset} ready in {folder}")

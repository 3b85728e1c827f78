"""``fewshot-nsl leaderboard``: all evaluations, ranked per task, as a table, CSV or plot."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fewshot_nsl.errors import UserError
from fewshot_nsl.results import leaderboard


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("leaderboard", help="print the ranked leaderboard", description=__doc__)
    parser.add_argument("--csv", type=Path, default=Path("leaderboard.csv"), help="leaderboard CSV (default leaderboard.csv)")
    parser.add_argument("--format", choices=("markdown", "csv"), default="markdown", help="output format (default markdown)")
    parser.add_argument("--dataset", help="only this dataset")
    parser.add_argument("--ways", type=int, help="only this many ways")
    parser.add_argument("--shots", type=int, help="only this many shots")
    parser.add_argument("--where", action="append", default=[], metavar="COLUMN=VALUE",
                        help="only rows whose COLUMN equals VALUE (any column, e.g. maml_head=learned); repeatable")
    parser.add_argument("--group-by", action="append", default=[], metavar="COLUMN",
                        help="also rank within groups of this column (e.g. similarity, config_hash); repeatable")
    parser.add_argument("--plot", type=Path, help="also draw accuracies with CI error bars to this PNG")
    parser.add_argument("--mark-provenance", action="store_true",
                        help="write the provenance column (clean/dirty/unverified) into the CSV for rows that predate it")
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> None:
    """Status lines go to stderr: stdout carries the table alone (``--format csv`` can be piped into a file)."""
    if not args.csv.exists():
        raise UserError(f"no leaderboard at {args.csv}; evaluate a run first (`fewshot-nsl eval --run-dir ...`) or pass --csv")
    if args.plot:
        leaderboard.check_plot_path(args.plot)
    if args.mark_provenance:
        marked = leaderboard.mark_provenance(args.csv)
        counts = marked["provenance"].value_counts().to_dict()
        print(f"{args.csv}: provenance written ({', '.join(f'{n} {k}' for k, n in sorted(counts.items()))})", file=sys.stderr)
    where = dict(_pair(item) for item in args.where)
    where |= {k: v for k, v in (("dataset", args.dataset), ("ways", args.ways), ("shots", args.shots)) if v is not None}
    table = leaderboard.ranked(leaderboard.read(args.csv), where, args.group_by)
    if table.empty:
        print("no rows match the filters")
        return
    print(leaderboard.render(table, args.format, args.group_by))
    if args.plot:
        leaderboard.plot(table, args.plot)
        print(f"plot written to {args.plot}", file=sys.stderr)


def _pair(item: str) -> tuple[str, str]:
    column, sep, value = item.partition("=")
    if not sep or not column:
        raise UserError(f"--where takes COLUMN=VALUE, got {item!r}")
    return column, value

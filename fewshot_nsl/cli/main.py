"""The ``fewshot-nsl`` command: train, eval, leaderboard, data, episodes, info, nads, spectrum.

Every subcommand lives in its own module and registers its own parser; a
``UserError`` anywhere becomes a one-line message and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from fewshot_nsl import __version__
from fewshot_nsl.cli import (
    data_cmd, episodes_cmd, eval_cmd, info_cmd, leaderboard_cmd, nads_cmd, spectrum_cmd, train_cmd,
)  # fmt: skip
from fewshot_nsl.errors import Interrupted, UserError
from fewshot_nsl.runtime import reexec_with_fast_malloc

COMMANDS = (train_cmd, eval_cmd, leaderboard_cmd, data_cmd, episodes_cmd, info_cmd, nads_cmd, spectrum_cmd)
HEAVY = {"train", "eval", "episodes"}


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (no usage block), exit status 2, like every other error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}; see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="fewshot-nsl",
        description="Few-shot learning with Neural Similarity Learning: train, evaluate on fixed episodes, compare.",
    )
    parser.add_argument("--version", action="version", version=f"fewshot-nsl {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        module.register(commands)
    return parser


def run(argv: list[str]) -> int:
    """Parse and run one command; returns the exit status (used by tests in-process)."""
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except UserError as error:
        if args.debug:
            raise
        print(f"fewshot-nsl: error: {error}", file=sys.stderr)
        return 2
    except Interrupted as stop:
        print(f"fewshot-nsl: {stop}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("fewshot-nsl: interrupted; checkpoints and leaderboard rows already written are kept", file=sys.stderr)
        return 130
    return 0


def main() -> None:
    """Console entry point: re-exec once with the fast malloc settings for heavy commands."""
    argv = sys.argv[1:]
    if argv and argv[0] in HEAVY:
        reexec_with_fast_malloc(argv)
    sys.exit(run(argv))

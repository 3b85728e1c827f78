"""``fewshot-nsl eval``: accuracy ± 95% CI of a trained run on fixed test episodes."""

from __future__ import annotations

import argparse
from pathlib import Path

from fewshot_nsl.engine.evaluator import EvalRequest, evaluate_run
from fewshot_nsl.learners.logreg import EVAL_HEADS
from fewshot_nsl.results.stats import Summary


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("eval", help="evaluate a run on fixed test episodes", description=__doc__)
    parser.add_argument("--run-dir", type=Path, required=True, help="directory written by `fewshot-nsl train`")
    parser.add_argument("--ways", type=int, help="classes per episode (default: the protocol's, 5)")
    parser.add_argument("--shots", type=int, help="support images per class (default: the training shots)")
    parser.add_argument("--queries", type=int, help="queries per class (default: the protocol's, 15)")
    parser.add_argument("--episodes", type=int, help="episodes (default: the protocol's, 1000 Omniglot, 600 Mini-ImageNet)")
    parser.add_argument("--manifest", type=Path, help="an explicit episode manifest (.npz) instead of the standard one")
    parser.add_argument("--leaderboard", type=Path, default=Path("leaderboard.csv"), help="leaderboard CSV to append to (default leaderboard.csv)")
    parser.add_argument("--data-root", help="folder holding the datasets (default: the run's, then $FEWSHOT_NSL_DATA)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    parser.add_argument("--checkpoint", choices=("best", "last"), default="best", help="which checkpoint (default best on validation)")
    parser.add_argument(
        "--head", choices=EVAL_HEADS,
        help="score episodes with this head on the backbone's features instead of the learner's own: prototype "
        "(ProtoNet's class means) or logreg (a logistic regression fitted on each support set, Tian et al. 2020)",
    )  # fmt: skip
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> None:
    def report(summary: Summary, row: dict) -> None:
        """Printed before the leaderboard append, so the result is on screen even if the append fails."""
        head = f" ({args.head} head)" if args.head else ""
        checkpoint = " (last checkpoint)" if args.checkpoint == "last" else ""
        print(f"{row['dataset']}/{row['protocol']} {row['ways']}-way {row['shots']}-shot{head}{checkpoint}: {summary}  "
              f"[{row['manifest']} #{row['manifest_hash']}]", flush=True)  # fmt: skip

    evaluate_run(
        EvalRequest(
            run_dir=args.run_dir, ways=args.ways, shots=args.shots, queries=args.queries, episodes=args.episodes,
            leaderboard=args.leaderboard, data_root=args.data_root, device=args.device,
            checkpoint=args.checkpoint, manifest=args.manifest, progress=not args.no_progress, head=args.head,
        ),
        report,
    )  # fmt: skip

"""Did training help? A trained run against the same seeded network left untrained, on the same episodes."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from fewshot_nsl.results import leaderboard
from fewshot_nsl.results.stats import Summary, confidence_interval


def paired_gain(root: Path, trained_dir: str, untrained_dir: str) -> tuple[pd.Series, pd.Series, Summary]:
    """The two runs' leaderboard rows (first the trained one, as evaluated in that order into
    ``root/leaderboard.csv``) and the per-episode accuracy gain of the trained run, with its 95% CI: paired
    on identical episodes, so the episodes' own spread cancels."""
    board = leaderboard.read(root / "leaderboard.csv")
    trained, untrained = board.iloc[0], board.iloc[1]
    assert trained["manifest_hash"] == untrained["manifest_hash"]
    accuracies = [pd.read_csv(root / run_dir / "eval" / f"{trained['manifest']}.csv")["acc"] for run_dir in (trained_dir, untrained_dir)]
    return trained, untrained, confidence_interval((accuracies[0] - accuracies[1]).tolist())

"""The leaderboard CSV: one row per evaluation, appended safely, printed ranked.

Appending rewrites the file through a temporary file and ``os.replace``, so
a crash or a bad row never truncates results already written; a file that
cannot be parsed is refused rather than overwritten. Appends hold a file
lock (``<name>.lock`` beside the CSV) from read to replace, so concurrent
writers (two evaluations, two benchmark processes) never lose each other's rows.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd
from filelock import FileLock

from fewshot_nsl.errors import UserError

COLUMNS = [
    "timestamp", "method", "backbone", "similarity", "dataset", "protocol", "ways", "shots", "queries",
    "episodes", "acc", "ci95", "manifest", "manifest_hash", "parameters", "train_episodes", "train_seconds",
    "seed", "version", "git_commit", "run_dir", "recipe", "train_ways", "train_shots", "train_queries",
    "meta_batch", "lr_schedule", "maml_head", "inner_steps", "eval_inner_steps", "inner_lr", "inner_loss", "maml_order",
    "maml_plus_plus",
]  # fmt: skip
RANK_KEYS = ["dataset", "protocol", "ways", "shots"]


def read(path: Path) -> pd.DataFrame:
    """The leaderboard as a DataFrame (empty with the standard columns if the file is absent)."""
    if not path.exists():
        return pd.DataFrame(columns=COLUMNS)
    try:
        frame = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise UserError(f"{path} is not a readable leaderboard CSV ({type(error).__name__}); fix or move it") from None
    missing = [c for c in ("method", "dataset", "acc") if c not in frame.columns]
    if missing:
        raise UserError(f"{path} lacks the column(s) {', '.join(missing)}; is it a fewshot-nsl leaderboard?")
    return frame


def append(path: Path, row: dict[str, Any]) -> pd.DataFrame:
    """Add one row, keeping every existing row and any extra columns."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        frame = read(path)
        new = pd.DataFrame([{column: row.get(column) for column in COLUMNS} | row])
        combined = new if frame.empty else pd.concat([frame, new], ignore_index=True)
        handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(handle)
        try:
            combined.to_csv(tmp, index=False)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return combined


def ranked(frame: pd.DataFrame, dataset: str | None = None, ways: int | None = None, shots: int | None = None) -> pd.DataFrame:
    """Filter, then sort each task group (dataset, protocol, ways, shots) by accuracy, best first."""
    for column, value in (("dataset", dataset), ("ways", ways), ("shots", shots)):
        if value is not None:
            frame = frame[frame[column] == value]
    frame = frame.sort_values(RANK_KEYS + ["acc"], ascending=[True] * len(RANK_KEYS) + [False])
    return frame.assign(rank=frame.groupby(RANK_KEYS, dropna=False).cumcount() + 1)


def render(frame: pd.DataFrame, fmt: str) -> str:
    """A compact table: ``markdown`` (aligned text) or ``csv``."""
    recipes = frame["recipe"].astype(object) if "recipe" in frame else pd.Series(None, index=frame.index, dtype=object)
    frame = frame.assign(recipe=recipes.fillna("—"))
    shown = frame.assign(
        **{"acc %": (100 * frame["acc"]).round(2), "± ci95": (100 * frame["ci95"]).round(2)}
    )[["rank", "dataset", "protocol", "ways", "shots", "method", "backbone", "similarity", "acc %", "± ci95",
       "episodes", "parameters", "train_episodes", "seed", "recipe", "run_dir"]]  # fmt: skip
    if fmt == "csv":
        return shown.to_csv(index=False)
    header = "| " + " | ".join(shown.columns) + " |"
    rule = "|" + "|".join("---" for _ in shown.columns) + "|"
    rows = ["| " + " | ".join(str(v) for v in values) + " |" for values in shown.itertuples(index=False)]
    return "\n".join([header, rule, *rows])


def plot(frame: pd.DataFrame, path: Path) -> None:
    """Horizontal bars of accuracy with 95% CI error bars, one per evaluation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [
        f"{r.method}/{r.backbone}/{r.similarity} · {r.dataset} {r.ways}w{r.shots}s"
        + (f" · {r.recipe}" if isinstance(getattr(r, "recipe", None), str) else "")
        for r in frame.itertuples()
    ]
    figure, axis = plt.subplots(figsize=(9, 0.4 * len(frame) + 1.2))
    axis.barh(range(len(frame)), 100 * frame["acc"], xerr=100 * frame["ci95"], capsize=3, color="tab:blue")
    axis.set_yticks(range(len(frame)), labels, fontsize=8)
    axis.invert_yaxis()
    axis.set_xlabel("accuracy % (95% CI)")
    low = max(0.0, float(100 * (frame["acc"] - frame["ci95"]).min()) - 5)
    axis.set_xlim(low, 100)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)

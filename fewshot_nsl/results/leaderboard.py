"""The leaderboard CSV: one row per evaluation, appended safely, printed ranked.

Appending rewrites the file through a temporary file and ``os.replace``, so
a crash or a bad row never truncates results already written; a file that
cannot be parsed is refused rather than overwritten. Appends hold a file
lock (``<name>.lock`` beside the CSV) from read to replace, so concurrent
writers (two evaluations, two benchmark processes) never lose each other's rows.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import pandas as pd
from filelock import FileLock

from fewshot_nsl.errors import UserError
from fewshot_nsl.results.provenance import DIRTY, UNVERIFIED

COLUMNS = [
    "timestamp", "method", "backbone", "similarity", "dataset", "protocol", "ways", "shots", "queries",
    "episodes", "acc", "ci95", "manifest", "manifest_hash", "parameters", "train_episodes", "train_seconds",
    "seed", "version", "git_commit", "git_dirty", "train_commits", "provenance", "run_dir", "recipe", "config_hash", "train_ways", "train_shots",
    "train_queries", "meta_batch", "lr_schedule", "train_on_val", "augmentation", "conv4_downsample", "nsl_kind", "nsl_form", "nsl_hidden", "maml_head", "maml_head_init", "inner_steps", "eval_inner_steps", "inner_lr", "inner_loss", "maml_order",
    "maml_plus_plus", "eval_head", "surrogate_classes", "samples_per_class", "init_from", "weights", "eval_checkpoint",
]  # fmt: skip
RANK_KEYS = ["dataset", "protocol", "ways", "shots"]
# Hashes and names read as text: a commit like 0508319 or a config hash of digits is not a number.
TEXT_COLUMNS = ("git_commit", "train_commits", "config_hash", "manifest_hash", "manifest", "version", "run_dir", "recipe")


def read(path: Path) -> pd.DataFrame:
    """The leaderboard as a DataFrame (empty with the standard columns if the file is absent)."""
    if not path.exists():
        return pd.DataFrame(columns=COLUMNS)
    if path.is_dir():
        raise UserError(f"{path} is a folder, not a leaderboard CSV; give the path of a CSV file")
    try:
        frame = pd.read_csv(path, dtype={column: str for column in TEXT_COLUMNS})
        written = pd.read_csv(path, dtype=str)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise UserError(f"{path} is not a readable leaderboard CSV ({type(error).__name__}); fix or move it") from None
    except OSError as error:
        raise UserError(f"cannot read the leaderboard {path} ({error.strerror or error}); fix its permissions or give another path") from None
    frame = _integers_as_written(frame, written)
    missing = [c for c in ("method", "dataset", "acc") if c not in frame.columns]
    if missing:
        raise UserError(f"{path} lacks the column(s) {', '.join(missing)}; is it a fewshot-nsl leaderboard?")
    accuracy = pd.to_numeric(frame["acc"], errors="coerce")
    broken = frame.index[accuracy.isna() | (accuracy < 0) | (accuracy > 1)]
    if len(broken):
        raise UserError(
            f"{path} row {int(broken[0]) + 2} has acc {frame['acc'].iloc[broken[0]]!r}, not a number in [0, 1]; "
            f"fix the file by hand (its last good version is {backup_path(path).name} if it exists)"
        )
    return with_provenance(frame)


def _integers_as_written(frame: pd.DataFrame, written: pd.DataFrame) -> pd.DataFrame:
    """Integer columns with blanks (e.g. ``nsl_hidden``, empty for rows without dynamic NSL), which pandas
    reads as float, as nullable integers: a filter then matches ``64`` and a rewrite keeps writing ``64``, not
    ``64.0``. Only columns whose every written value is an integer; what the file says is kept as it is."""
    integral = [
        column for column in frame.columns
        if frame[column].dtype.kind == "f" and written[column].dropna().str.fullmatch(r"-?\d+").all()
    ]  # fmt: skip
    return frame.astype(dict.fromkeys(integral, "Int64"))


def check_appendable(path: Path) -> None:
    """Fail now if a row could not be appended to ``path`` later (a folder, a file that cannot be read, parsed
    or written, a parent that is a file): checked before an evaluation, so its minutes are not wasted."""
    read(path)
    folder = next(parent for parent in path.absolute().parents if parent.exists())
    if not folder.is_dir():
        raise UserError(f"cannot create the leaderboard {path}: {folder} is a file; give another path")
    target = path if path.exists() else folder
    if not os.access(target, os.W_OK) or (path.exists() and not os.access(path.parent, os.W_OK)):
        raise UserError(f"cannot write the leaderboard {path} (permission denied); fix its permissions or give another path")


def with_provenance(frame: pd.DataFrame) -> pd.DataFrame:
    """Fill ``provenance`` for rows written before it existed: ``dirty`` where ``git_dirty`` says so, else
    ``unverified`` (their training commit was not recorded), so no old row passes for a clean one."""
    recorded = frame["provenance"] if "provenance" in frame else pd.Series(None, index=frame.index, dtype=object)
    if "git_dirty" in frame:
        dirty = frame["git_dirty"].astype(str).str.lower() == "true"
    else:
        dirty = pd.Series(False, index=frame.index)
    derived = pd.Series(UNVERIFIED, index=frame.index, dtype=object).where(~dirty, DIRTY)
    return frame.assign(provenance=recorded.astype(object).fillna(derived))


def backup_path(path: Path) -> Path:
    return path.with_name(path.name + ".bak")


def append(path: Path, row: dict[str, Any]) -> pd.DataFrame:
    """Add one row, keeping every existing row and any extra columns."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        frame = read(path)
        new = pd.DataFrame([{column: row.get(column) for column in COLUMNS} | row])
        combined = new if frame.empty else pd.concat([frame, new], ignore_index=True)
        _replace(path, combined)
    return combined


def mark_provenance(path: Path) -> pd.DataFrame:
    """Write the ``provenance`` column into a leaderboard whose rows predate it (see ``with_provenance``)."""
    with FileLock(str(path) + ".lock"):
        frame = read(path)
        _replace(path, frame)
    return frame


def _replace(path: Path, frame: pd.DataFrame) -> None:
    """Atomically replace ``path`` by ``frame``, keeping the previous version as the backup and the
    file's permissions (a new file gets the umask's, as any other file would)."""
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        os.chmod(tmp, stat.S_IMODE(path.stat().st_mode) if path.exists() else 0o666 & ~_umask())
        frame.to_csv(tmp, index=False)
        if path.exists():
            shutil.copy2(path, backup_path(path))  # the version before this rewrite
        os.replace(tmp, path)
    except OSError as error:
        raise UserError(f"could not write the leaderboard {path} ({error.strerror or error}); it is unchanged") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    """The process umask (reading it means setting it: set back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _equal(values: pd.Series, wanted: str) -> pd.Series:
    """Which ``values`` equal ``wanted``: as text, or as numbers where both are numbers (``64`` matches the
    ``64.0`` of an integer column written as float because of blanks); hashes and names compare as text only."""
    same = values.astype(str) == wanted
    try:
        number = float(wanted)
    except ValueError:
        return same
    return same if values.name in TEXT_COLUMNS else same | (pd.to_numeric(values, errors="coerce") == number)


def ranked(frame: pd.DataFrame, where: dict[str, str] | None = None, group_by: Sequence[str] = ()) -> pd.DataFrame:
    """Keep rows whose columns equal ``where`` (as text, or as numbers), then rank by accuracy, best
    first, within each task group (dataset, protocol, ways, shots) and any ``group_by`` columns."""
    for column in [*(where or {}), *group_by]:
        if column not in frame.columns:
            raise UserError(f"the leaderboard has no column {column!r}; columns: {', '.join(frame.columns)}")
    for column, value in (where or {}).items():
        frame = frame[_equal(frame[column], str(value))]
    keys = RANK_KEYS + [c for c in group_by if c not in RANK_KEYS]
    frame = frame.sort_values(keys + ["acc"], ascending=[True] * len(keys) + [False])
    return frame.assign(rank=frame.groupby(keys, dropna=False).cumcount() + 1)


def render(frame: pd.DataFrame, fmt: str, extra: Sequence[str] = ()) -> str:
    """A compact table (plus ``extra`` columns): ``markdown`` (aligned text) or ``csv``."""
    recipes = frame["recipe"].astype(object) if "recipe" in frame else pd.Series(None, index=frame.index, dtype=object)
    heads = frame["eval_head"].astype(object) if "eval_head" in frame else pd.Series(None, index=frame.index, dtype=object)
    weights = frame["weights"].astype(object) if "weights" in frame else pd.Series(None, index=frame.index, dtype=object)
    # rows before heads: the learner's own; rows before weight options: real weights
    frame = frame.assign(recipe=recipes.fillna("—"), head=heads.fillna("own"), weights=weights.fillna("real"))
    shown = frame.assign(
        **{"acc %": (100 * frame["acc"]).round(2), "± ci95": (100 * frame["ci95"]).round(2)}
    )[["rank", "dataset", "protocol", "ways", "shots", "method", "backbone", "similarity", "weights", "head", "acc %", "± ci95",
       "episodes", "parameters", "train_episodes", "seed", "recipe", *[c for c in extra if c not in ("recipe", "provenance")],
       "provenance", "run_dir"]]  # fmt: skip
    if fmt == "csv":
        return shown.to_csv(index=False)
    header = "| " + " | ".join(shown.columns) + " |"
    rule = "|" + "|".join("---" for _ in shown.columns) + "|"
    rows = ["| " + " | ".join(str(v) for v in values) + " |" for values in shown.itertuples(index=False)]
    return "\n".join([header, rule, *rows])


def check_plot_path(path: Path) -> None:
    """Refuse a plot path matplotlib cannot write before anything is drawn or rewritten."""
    from matplotlib.figure import Figure

    formats = sorted(Figure().canvas.get_supported_filetypes())
    if path.suffix.lower().lstrip(".") not in formats:
        raise UserError(f"--plot {path}: matplotlib cannot write {path.suffix or 'a file without extension'}; end it in one of .{', .'.join(formats)}")
    if not path.parent.is_dir():
        raise UserError(f"--plot {path}: the folder {path.parent} does not exist; create it or give another path")


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

"""Run directories: resolved config, checkpoints and a training summary.

Checkpoints are written to a temporary file, flushed to disk and renamed,
so an interrupted save (even SIGKILL or a power cut) never replaces a good
checkpoint with a broken one. ``last.pt`` is a full training state (model,
optimiser, schedule, iteration, every random state, config, version) that
``fewshot-nsl train --resume`` continues from; ``best.pt`` holds the model
of the best validation. Every checkpoint is read with
``torch.load(weights_only=True)``, which refuses pickled code.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
import yaml

import fewshot_nsl
from fewshot_nsl.config import LEGACY_VALUES, RunConfig, save_config
from fewshot_nsl.errors import UserError
from fewshot_nsl.learners import FewShotLearner, build_learner

CONFIG_FILE = "config.yaml"
SUMMARY_FILE = "train_summary.json"
METRICS_FILE = "metrics.csv"
BEST, LAST = "best.pt", "last.pt"
# Config keys that decide the model's parameters: a checkpoint and config.yaml must agree on them.
MODEL_KEYS = ("method", "backbone", "similarity", "nsl_form", "nsl_hidden", "width", "plain_stem", "conv4_downsample", "distance",
              "head", "ways", "meta_sgd", "lslr", "per_step_bn", "inner_steps")  # fmt: skip


def save_atomically(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file, fsync, then rename over ``path`` (and fsync the folder).

    A failed write (disk full, ...) removes the temporary file and leaves the previous ``path`` intact.
    """
    _write_atomically(path, lambda handle: torch.save(obj, handle))


def write_text_atomically(path: Path, text: str) -> None:
    """``text`` written as ``save_atomically`` writes a checkpoint: a reader never sees a torn file."""
    _write_atomically(path, lambda handle: handle.write(text.encode()))


def _write_atomically(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write to a temporary file of its own beside ``path`` (concurrent writers of one file never share it),
    fsync, then rename over ``path``."""
    descriptor, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(name)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        kept = f"the previous {path.name} is intact" if path.exists() else f"no {path.name} was written"
        raise UserError(f"could not write {path} ({error.strerror or error}); {kept}: free space and try again") from None
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint as plain tensors and containers; anything that would run code is refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = str(error).splitlines()[0]
        raise UserError(f"{path} is not a safe fewshot-nsl checkpoint (refused to unpickle it: {reason})") from None
    except (RuntimeError, EOFError, OSError) as error:
        raise UserError(f"{path} cannot be read as a checkpoint ({type(error).__name__}); retrain or restore it") from None


def random_state(generators: dict[str, torch.Generator]) -> dict[str, Any]:
    """Every random state a training run draws from, as tensors and plain values: torch's, NumPy's and
    Python's global ones and the run's named generators (``sampler``, ``augmentation``, ``dropblock``)."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(gauss)],
        "python": random.getstate(),
        **{name: generator.get_state() for name, generator in generators.items()},
    }


def restore_random_state(state: dict[str, Any], generators: dict[str, torch.Generator]) -> None:
    """Set the states ``random_state`` saved. A named generator the checkpoint lacks keeps its seeded
    state: ``dropblock``, in checkpoints written before DropBlock had a generator of its own (its masks
    came from torch's global one then, so such a run resumes as reproducibly as it ever could)."""
    torch.set_rng_state(state["torch"])
    kind, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    random.setstate(_tuples(state["python"]))
    for name, generator in generators.items():
        if name != "dropblock" or name in state:
            generator.set_state(state[name])


def _tuples(value: Any) -> Any:
    """``random.setstate`` wants the tuples it gave (a checkpoint may hand lists back)."""
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def checkpoint_metadata(config: RunConfig, image_shape: tuple[int, int, int]) -> dict[str, Any]:
    """What a checkpoint carries besides weights: the resolved config, the package version and the
    (C, H, W) of the images the model was built for (so it can be rebuilt without reading data)."""
    return {"config": config.to_dict(), "version": fewshot_nsl.__version__, "image_shape": list(image_shape)}


def prepare_run_dir(run_dir: Path, config: RunConfig, overwrite: bool) -> Path | None:
    """Create the run directory for a new run; returns where an overwritten run was moved.

    A directory holding a run (finished or interrupted) is refused unless
    ``overwrite``; then the old run is moved aside whole, never mixed with
    the new one nor deleted.
    """
    moved = None
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--run-dir {run_dir} is a file, not a folder; give another --run-dir")
    if run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            hint = f"resume it with `fewshot-nsl train --resume {run_dir}`, " if (run_dir / LAST).exists() else ""
            raise UserError(f"{run_dir} already holds a run; {hint}choose another --run-dir, or pass --overwrite (moves it aside)")
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        moved = run_dir.with_name(f"{run_dir.name}.replaced-{stamp}")
        shutil.move(str(run_dir), moved)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create --run-dir {run_dir} ({error.strerror or error}); give another --run-dir") from None
    save_config(config, run_dir / CONFIG_FILE)
    return moved


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    write_text_atomically(run_dir / SUMMARY_FILE, json.dumps(summary, indent=2))


def read_summary(run_dir: Path) -> dict[str, Any]:
    """The training summary (empty if the run has none); a damaged one is a one-line error."""
    path = run_dir / SUMMARY_FILE
    if not path.exists():
        return {}
    try:
        summary = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{path} is damaged ({error}); restore it, or delete it if the run is to be resumed") from None
    if not isinstance(summary, dict):
        raise UserError(f"{path} is damaged (not a JSON object); restore it, or delete it if the run is to be resumed")
    return summary


def read_config(run_dir: Path) -> RunConfig:
    path = run_dir / CONFIG_FILE
    if not path.exists():
        raise UserError(f"{run_dir} has no {CONFIG_FILE}; train into it first with `fewshot-nsl train --run-dir {run_dir}`")
    try:
        saved = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise UserError(f"{path} is damaged ({str(error).splitlines()[0]}); restore it from a checkpoint's config") from None
    if not isinstance(saved, dict):
        raise UserError(f"{path} is damaged (not a mapping of keys to values); restore it from a checkpoint's config")
    try:
        return RunConfig().updated({**LEGACY_VALUES, **saved})
    except UserError as error:
        raise UserError(f"{path}: {error}") from None


@dataclass(frozen=True)
class RunRecord:
    """What a finished run directory holds: its config, a checkpoint's weights, the training summary,
    and the (C, H, W) of the images the model was built for (None for checkpoints older than that)."""

    config: RunConfig
    model_state: dict[str, torch.Tensor]
    summary: dict[str, Any]
    image_shape: tuple[int, int, int] | None


def load_run(run_dir: Path, which: str = "best") -> RunRecord:
    """A finished run, checked: the checkpoint must have been trained as the model the config builds."""
    if which not in ("best", "last"):
        raise UserError(f"checkpoint must be 'best' or 'last', got {which!r}")
    checkpoint = run_dir / (BEST if which == "best" else LAST)
    config = read_config(run_dir)
    if not checkpoint.exists():
        other = LAST if which == "best" else BEST
        use_other = f"use its {other} (--checkpoint {other.removesuffix('.pt')})" if (run_dir / other).exists() else ""
        if (run_dir / SUMMARY_FILE).exists():  # finished: nothing to resume
            raise UserError(f"{run_dir} is a finished run without {checkpoint.name}; {use_other or 'train it again'}")
        advice = f"{use_other}, or " if use_other else ""
        raise UserError(f"{run_dir} has no {checkpoint.name} yet; {advice}finish its training with `fewshot-nsl train --resume {run_dir}`")
    state = load_checkpoint(checkpoint)
    trained_as = {**LEGACY_VALUES, **state.get("config", {})}
    differs = [
        f"{key} {trained_as.get(key)!r} in {checkpoint.name} vs {getattr(config, key)!r} in {CONFIG_FILE}"
        for key in MODEL_KEYS
        if "config" in state and trained_as.get(key) != getattr(config, key)
    ]
    if differs:
        raise UserError(f"{checkpoint} was trained as another model: {'; '.join(differs)}")
    summary = read_summary(run_dir)
    shape = tuple(state["image_shape"]) if "image_shape" in state else None
    return RunRecord(config, state["model"], summary, shape)  # type: ignore[arg-type]


def trained_learner(record: RunRecord, run_dir: Path, image_shape: tuple[int, int, int]) -> FewShotLearner:
    """The learner ``record``'s config builds for ``image_shape``, holding the record's weights (train
    mode, on the CPU): what evaluation and the Python API score with. A checkpoint that does not fit
    that model is a ``UserError`` naming the first mismatch."""
    learner = build_learner(record.config, image_shape)
    try:
        learner.load_state_dict(record.model_state)
    except RuntimeError as error:
        lines = str(error).splitlines()
        detail = lines[1].strip() if len(lines) > 1 else str(error)
        raise UserError(f"the checkpoint in {run_dir} does not fit the model its {CONFIG_FILE} builds ({detail})") from None
    return learner

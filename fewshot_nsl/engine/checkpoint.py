"""Run directories: resolved config, checkpoints and a training summary.

Checkpoints are written to a temporary file and renamed, so an interrupted
save never replaces a good checkpoint with a broken one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import yaml

from fewshot_nsl.config import RunConfig, save_config
from fewshot_nsl.errors import UserError

CONFIG_FILE = "config.yaml"
SUMMARY_FILE = "train_summary.json"
METRICS_FILE = "metrics.csv"
BEST, LAST = "best.pt", "last.pt"


def save_atomically(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def prepare_run_dir(run_dir: Path, config: RunConfig, overwrite: bool) -> None:
    """Create the run directory; refuse to train over a finished run unless told to."""
    if (run_dir / BEST).exists() and not overwrite:
        raise UserError(f"{run_dir} already holds a trained run; choose another --run-dir or pass --overwrite")
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir / CONFIG_FILE)


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    (run_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))


def load_run(run_dir: Path, which: str = "best") -> tuple[RunConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """Config, model state and training summary of a finished run."""
    checkpoint = run_dir / (BEST if which == "best" else LAST)
    if not (run_dir / CONFIG_FILE).exists() or not checkpoint.exists():
        raise UserError(f"{run_dir} has no {CONFIG_FILE} and {checkpoint.name}; train into it first with `fewshot-nsl train --run-dir {run_dir}`")
    config = RunConfig().updated(yaml.safe_load((run_dir / CONFIG_FILE).read_text()) or {})
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    summary_path = run_dir / SUMMARY_FILE
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    return config, state["model"], summary

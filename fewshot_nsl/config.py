"""Run configuration: one dataclass, loaded from YAML, overridden by CLI flags.

Fields left ``None`` mean "the recipe's default for this method and dataset"
(e.g. MAML's inner learning rate is 0.4 on Omniglot, 0.01 on Mini-ImageNet,
after Finn et al. 2017); ``resolve`` fills them in, and the resolved config is
what a run directory records.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import yaml

from fewshot_nsl.errors import UserError

METHODS = ("protonet", "maml")


@dataclass
class RunConfig:
    # what is trained
    method: str = "protonet"
    backbone: str = "conv4"
    similarity: str | None = None
    nsl_form: str = "diagonal"
    nsl_hidden: int = 64
    width: int | None = None
    plain_stem: bool = False
    drop_rate: float = 0.0
    distance: str = "euclidean"
    # data
    dataset: str = "omniglot"
    protocol: str | None = None
    image_size: int | None = None
    data_root: str | None = None
    # training task and budget
    ways: int = 20
    shots: int = 5
    queries: int = 5
    episodes: int = 2000
    meta_batch: int | None = None
    lr: float = 1e-3
    lr_step: int = 2000
    lr_gamma: float = 0.5
    weight_decay: float = 0.0
    # MAML
    inner_steps: int | None = None
    eval_inner_steps: int | None = None
    inner_lr: float | None = None
    first_order: bool = False
    meta_sgd: bool = False
    anil: bool = False
    head: str = "zero"
    vectorise: bool | None = None
    # validation and bookkeeping
    train_on_val: bool = False
    val_every: int = 500
    val_episodes: int = 200
    val_ways: int | None = None
    val_shots: int | None = None
    seed: int = 0
    device: str = "auto"
    channels_last: bool | None = None
    run_dir: str | None = None

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def updated(self, overrides: dict[str, Any]) -> "RunConfig":
        """A copy with ``overrides`` applied; unknown keys are an error naming the valid ones."""
        unknown = sorted(set(overrides) - set(self.field_names()))
        if unknown:
            raise UserError(f"unknown config key(s) {', '.join(unknown)}; valid keys: {', '.join(self.field_names())}")
        return dataclasses.replace(self, **overrides)

    def resolve(self) -> "RunConfig":
        """Fill recipe defaults that depend on method and dataset, and check the result."""
        if self.method not in METHODS:
            raise UserError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        mini = self.dataset == "miniimagenet"
        maml = self.method == "maml"
        defaults: dict[str, Any] = {
            "width": 32 if (maml and mini) else 64,
            "meta_batch": (4 if mini else 32) if maml else 1,
            "inner_steps": 5 if mini else 1,
            "eval_inner_steps": 10 if mini else 3,
            "inner_lr": 0.01 if mini else 0.4,
            # channels_last speeds up conv on CPU but slows second-order MAML.
            "channels_last": not maml,
            # vmap over tasks turns convolutions into grouped ones: slower on CPU,
            # meant for GPUs (benchmarks/maml_speed.py).
            "vectorise": self.device.startswith("cuda") or (self.device == "auto" and torch.cuda.is_available()),
        }
        filled = {k: v for k, v in defaults.items() if getattr(self, k) is None}
        resolved = dataclasses.replace(self, **filled)
        for name in ("ways", "shots", "queries", "episodes", "meta_batch", "val_every", "val_episodes"):
            if getattr(resolved, name) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(resolved, name)}")
        if resolved.lr <= 0:
            raise UserError(f"lr must be > 0, got {resolved.lr}")
        return resolved

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_config(path: str | Path) -> RunConfig:
    """Read a YAML config; a missing file or a bad key gives a one-line error."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise UserError(f"config file {path} is not valid YAML: {str(error).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must be a mapping of keys to values")
    try:
        return RunConfig().updated(data)
    except UserError as error:
        raise UserError(f"{path}: {error}") from None


def save_config(config: RunConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))

"""``--amp``: bfloat16 autocast in training steps; weights, optimiser and evaluation stay float32."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from fewshot_nsl.config import RunConfig
from fewshot_nsl.engine.trainer import train
from fewshot_nsl.learners import recipe_columns, recipe_hash
from tests.test_bad_data_input import image_folder


@pytest.mark.parametrize("backbone,similarity", [("conv4", None), ("nsl-conv4", "dynamic")])
def test_mixed_precision_training_runs_and_keeps_float32_weights(backbone, similarity, tmp_path: Path, cache_dir: Path):
    config = RunConfig(
        method="protonet", backbone=backbone, similarity=similarity, nsl_hidden=8, width=8, dataset=str(image_folder(tmp_path / "pets")),
        image_size=16, ways=2, shots=1, queries=1, val_ways=2, val_queries=1, val_episodes=2, val_every=3, episodes=3,
        amp=True, run_dir=str(tmp_path / "run"),
    )  # fmt: skip
    train(config, progress=False)
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert all(t.dtype in (torch.float32, torch.int64) for t in state["model"].values())
    metrics = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert np.isfinite(metrics.query("split == 'train'")["loss"]).all()
    resolved = config.resolve()
    assert "amp-bf16" in recipe_columns(resolved)["recipe"]
    assert recipe_hash(resolved) != recipe_hash(resolved.updated({"amp": False}))
    # the same run in float32 ends close to, but not exactly at, the bfloat16 one: autocast was in effect
    train(config.updated({"amp": False, "run_dir": str(tmp_path / "fp32")}), progress=False)
    reference = torch.load(tmp_path / "fp32" / "last.pt", weights_only=True)["model"]
    floats = [k for k, v in reference.items() if v.is_floating_point()]
    assert any(not torch.equal(state["model"][k], reference[k]) for k in floats)
    for k in floats:
        torch.testing.assert_close(state["model"][k], reference[k], atol=0.05, rtol=0.05)

"""``--amp``: bfloat16 autocast in training steps; weights, optimiser and evaluation stay float32."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from fewshot_nsl.config import RunConfig
from fewshot_nsl.engine.trainer import train
from fewshot_nsl.learners import build_learner, recipe_columns, recipe_hash
from fewshot_nsl.runtime import seeded


def noise_folder(root: Path) -> Path:
    """<root>/<split>/<class>/<image>, two classes of two seeded noise PNGs per split: every episode has a gradient."""
    generator = torch.Generator().manual_seed(0)
    for split in ("train", "val", "test"):
        for name in ("a", "b"):
            (root / split / name).mkdir(parents=True)
            for index in range(2):
                pixels = torch.randint(0, 256, (10, 10, 3), dtype=torch.uint8, generator=generator)
                Image.fromarray(pixels.numpy()).save(root / split / name / f"{index}.png")
    return root


@pytest.mark.parametrize("backbone,similarity", [("conv4", None), ("nsl-conv4", "dynamic")])
def test_mixed_precision_training_runs_and_keeps_float32_weights(backbone, similarity, tmp_path: Path, cache_dir: Path):
    config = RunConfig(
        method="protonet", backbone=backbone, similarity=similarity, nsl_hidden=8, width=8, dataset=str(noise_folder(tmp_path / "pets")),
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

    # The same run in float32 from the same start: the weights both runs started from are the trainer's seeded construction.
    train(config.updated({"amp": False, "run_dir": str(tmp_path / "fp32")}), progress=False)
    reference = torch.load(tmp_path / "fp32" / "last.pt", weights_only=True)["model"]
    with seeded(resolved.seed):
        start = build_learner(resolved, (3, 16, 16))
    initial = start.state_dict()
    names = [name for name, _ in start.named_parameters()]
    amp_update, fp32_update = (
        torch.cat([(model[n] - initial[n]).flatten() for n in names]) for model in (state["model"], reference)
    )
    # three Adam steps move an entry by at most about lr each: the runs did start from these weights, and trained
    assert 0 < fp32_update.abs().max() <= 3.1 * resolved.lr
    # bfloat16 autocast was in effect (not bit-equal), and its update agrees with float32's in direction and size:
    # uncorrelated updates of that size would be about 1.4 of it apart, none at all 1; measured 0.16 (Conv-4) and
    # 0.27 (dynamic NSL; Adam's per-entry normalisation turns bfloat16 rounding of tiny gradients into whole steps).
    assert not torch.equal(amp_update, fp32_update)
    assert (amp_update - fp32_update).norm() <= 0.5 * fp32_update.norm()

"""How the accuracy suites label a row's network, and why a retrained run's old curve survives."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from benchmarks.accuracy import network_of, run_network


def test_rows_without_a_recorded_downsampling_read_as_max_pooling_and_other_backbones_have_none() -> None:
    rows = pd.DataFrame(
        {"backbone": ["conv4", "nsl-conv4", "conv4", "resnet12"], "conv4_downsample": [None, "stride", "maxpool", None]}
    )
    assert network_of(rows).tolist() == ["maxpool", "stride", "maxpool", "—"]
    legacy = pd.DataFrame({"backbone": ["conv4"]})  # a leaderboard from before the column existed
    assert network_of(legacy).tolist() == ["maxpool"]


def test_a_run_directory_names_its_downsampling_or_the_legacy_default(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text("method: maml\nconv4_downsample: stride\n")
    assert run_network(tmp_path) == "stride"
    (tmp_path / "config.yaml").write_text("method: maml\n")
    assert run_network(tmp_path) == "maxpool"

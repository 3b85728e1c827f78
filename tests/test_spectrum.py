"""Layer spectra (``fewshot-nsl spectrum``) against singular values known by construction."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from fewshot_nsl.analysis.spectrum import layer_matrices, singular_values, spectrum_distance, write_spectra
from fewshot_nsl.backbones import build_backbone, resolve_similarity
from fewshot_nsl.cli.main import run
from fewshot_nsl.config import RunConfig
from fewshot_nsl.engine.trainer import train
from fewshot_nsl.errors import UserError
from fewshot_nsl.nsl import StaticNSLConv2d


def _matrix_with_singular_values(values: torch.Tensor, columns: int, generator: torch.Generator) -> torch.Tensor:
    left, _ = torch.linalg.qr(torch.randn(len(values), len(values), generator=generator, dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(columns, len(values), generator=generator, dtype=torch.float64))
    return left @ torch.diag(values) @ right.T


def test_a_convolution_kernel_built_from_known_singular_values_gives_them_back() -> None:
    generator = torch.Generator().manual_seed(0)
    backbone = build_backbone("conv4", (1, 28, 28), width=8)
    wanted = torch.tensor([5.0, 3.0, 2.0, 1.5, 1.0, 0.5, 0.25, 0.125], dtype=torch.float64)
    with torch.no_grad():
        backbone.features[4].weight.copy_(_matrix_with_singular_values(wanted, 8 * 9, generator).view(8, 8, 3, 3))
    spectra = singular_values(backbone)
    assert list(spectra) == ["features.0", "features.4", "features.8", "features.12"]
    torch.testing.assert_close(spectra["features.4"], wanted, rtol=1e-6, atol=1e-6)


def test_static_nsl_is_read_as_its_folded_kernel_and_dynamic_nsl_without_its_meta_network() -> None:
    static = build_backbone("nsl-conv4", (1, 28, 28), resolve_similarity("nsl-conv4", "static"), width=8)
    layer = static.features[4]
    assert isinstance(layer, StaticNSLConv2d)
    with torch.no_grad():
        layer.M.copy_(torch.tensor([0.0, 1, 0, 1, 2, 1, 0, 1, 0]))  # a per-tap gain: corners off, centre doubled
    weight = layer.weight.detach().numpy()
    folded = weight * np.array([[0.0, 1, 0], [1, 2, 1], [0, 1, 0]])  # the kernel the layer applies, by hand
    expected = np.linalg.svd(folded.reshape(8, -1), compute_uv=False)
    np.testing.assert_allclose(singular_values(static)["features.4"].numpy(), expected, rtol=1e-6)

    dynamic = build_backbone("nsl-conv4", (1, 28, 28), resolve_similarity("nsl-conv4", "dynamic", hidden=4), width=8)
    matrices = layer_matrices(dynamic)
    assert list(matrices) == ["features.0", "features.4", "features.8", "features.12"]
    assert torch.equal(matrices["features.4"], dynamic.features[4].weight.detach().flatten(1))


def test_the_distance_compares_unit_norm_spectra_layer_by_layer() -> None:
    first = {"a": torch.tensor([4.0, 3.0]), "b": torch.tensor([1.0, 0.0])}
    second = {"a": torch.tensor([3.0, 4.0]), "b": torch.tensor([7.0, 0.0])}
    # layer a: |(0.8, 0.6) - (0.6, 0.8)| = 0.2·√2; layer b: equal after scaling
    assert spectrum_distance(first, second) == pytest.approx(0.2 * 2**0.5 / 2)
    assert spectrum_distance(first, {k: 10 * v for k, v in first.items()}) == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(UserError, match="one architecture"):
        spectrum_distance(first, {"a": torch.tensor([1.0, 2.0, 3.0]), "b": torch.tensor([1.0, 0.0])})
    with pytest.raises(UserError, match="one architecture"):
        spectrum_distance(first, {"a": torch.tensor([1.0, 2.0])})


def test_spectrum_cli_compares_trained_runs(tmp_path: Path, cache_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.test_bad_data_input import image_folder

    root = image_folder(tmp_path / "pets")
    common = dict(width=8, dataset=str(root), image_size=16, ways=2, shots=1, queries=1, val_ways=2, val_queries=1,
                  val_episodes=2, val_every=2, episodes=2)  # fmt: skip
    for name, extra in (("real", {}), ("binary", {"weights": "binary"}), ("static", {"backbone": "nsl-conv4"})):
        train(RunConfig(**common, **extra, run_dir=str(tmp_path / name)), progress=False)
    runs = [str(tmp_path / name) for name in ("real", "binary", "static")]
    assert run(["spectrum", *runs, "--out", str(tmp_path / "spectra")]) == 0
    assert "spectra of 3 run(s)" in capsys.readouterr().out
    distances = pd.read_csv(tmp_path / "spectra" / "distances.csv", index_col="run")
    assert np.allclose(np.diag(distances.to_numpy()), 0) and np.allclose(distances.to_numpy(), distances.to_numpy().T)
    assert distances.loc[runs[0], runs[1]] > 0
    rows = pd.read_csv(tmp_path / "spectra" / "spectra.csv")
    assert rows.groupby("run")["layer"].nunique().tolist() == [4, 4, 4] and (tmp_path / "spectra" / "spectra.png").stat().st_size > 0
    binary_first = rows[(rows["run"] == runs[1]) & (rows["layer"] == "features.4")]["singular_value"]
    assert len(binary_first) == 8

    resnet = RunConfig(**common | {"width": None}, backbone="resnet12-512", run_dir=str(tmp_path / "resnet"))
    train(resnet, progress=False)
    assert run(["spectrum", runs[0], str(tmp_path / "resnet"), "--out", str(tmp_path / "mixed")]) == 2
    assert "one architecture" in capsys.readouterr().err


def test_spectrum_refuses_an_out_that_is_a_file_and_mixed_architectures_before_writing(tmp_path: Path, capsys) -> None:
    (tmp_path / "file").write_text("keep")
    assert run(["spectrum", "nowhere", "--out", str(tmp_path / "file")]) == 2
    assert "is a file; give a folder path" in capsys.readouterr().err
    conv4 = singular_values(build_backbone("conv4", (1, 28, 28), width=8))
    with pytest.raises(UserError, match="one architecture"):
        write_spectra({"conv4": conv4, "other": {"layer": torch.ones(2)}}, tmp_path / "s")
    assert not (tmp_path / "s").exists()

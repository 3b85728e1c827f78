"""Neural anisotropy directions against models whose directions are known analytically."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
import torch.nn.functional as F

from fewshot_nsl.analysis.nads import (
    ScalarReadout,
    anisotropy_directions,
    dct_direction,
    directional_samples,
    evaluation_point,
    input_gradients,
    SeparabilityRecipe,
    separability,
)
from fewshot_nsl.cli.main import run

SIDE = 8
PIXELS = SIDE * SIDE


class CircularBoxBlur(nn.Module):
    """A fixed 3×3 mean filter with wrap-around: a low-pass filter diagonal in the 2-D DFT basis."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        padded = F.pad(images, (1, 1, 1, 1), mode="circular")
        return F.avg_pool2d(padded, 3, stride=1).flatten(1)


def test_a_linear_model_is_isotropic_its_covariance_is_the_identity_up_to_scale() -> None:
    # f(x) = w·x with w ~ N(0, I/D): the gradient is w, so Σ = I/D and every direction is equally easy.
    gradients = input_gradients(lambda g: ScalarReadout(nn.Flatten(), PIXELS, g), evaluation_point(1, SIDE, 0), 2048, seed=0)
    values = anisotropy_directions(gradients).eigenvalues[0]
    assert abs(values.sum().item() - 1.0) < 0.05  # trace = E|w|² = 1
    # 2048 draws in 64 dimensions: sample eigenvalues stay within the Marchenko-Pastur edges (1 ± 0.18)² of 1/D
    assert values.min() > 0.5 / PIXELS and values.max() < 1.6 / PIXELS


def test_a_low_pass_filter_makes_the_constant_image_the_leading_direction_with_its_analytic_eigenvalue() -> None:
    # f(x) = v·(h ⊛ x): Σ = Hᵀ E[vvᵀ] H = HᵀH / D, diagonal in the Fourier basis with eigenvalues |ĥ(ω)|² / D.
    build = lambda g: ScalarReadout(CircularBoxBlur(), PIXELS, g)  # noqa: E731
    nads = anisotropy_directions(input_gradients(build, evaluation_point(1, SIDE, 0), 4096, seed=1))
    constant = torch.full((SIDE, SIDE), 1 / SIDE)
    assert abs((nads.directions[0, 0] * constant).sum().item()) > 0.98  # unit vectors: |cos| with the DC image
    frequencies = 2 * torch.pi * torch.arange(SIDE) / SIDE
    one_axis = (1 + 2 * torch.cos(frequencies)) / 3  # DFT of the 3-tap mean filter
    analytic = ((one_axis[:, None] * one_axis[None, :]) ** 2 / PIXELS).flatten().sort(descending=True).values
    torch.testing.assert_close(nads.eigenvalues[0, 0], analytic[0], rtol=0.1, atol=0)
    # the spectrum falls as the filter's does: the weakest directions are the ones the filter removes
    assert nads.eigenvalues[0, -8:].max() < 0.05 * analytic[0]


class GlobalMean(nn.Module):
    """Only the mean of the image survives: separable along the constant direction and no other."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.mean((1, 2, 3)).unsqueeze(1)


def test_samples_are_separable_along_their_direction_only() -> None:
    direction = dct_direction(SIDE, 2, 5)
    images, labels = directional_samples(direction, 500, 0.7, 1.0, 1, torch.Generator().manual_seed(0))
    along = images.flatten(1) @ direction.flatten()
    torch.testing.assert_close(along, 0.7 * (2 * labels - 1).float(), rtol=0, atol=1e-5)  # noise is orthogonal to v
    assert torch.allclose(direction.norm(), torch.tensor(1.0)) and (dct_direction(SIDE, 0, 0) - 1 / SIDE).abs().max() < 1e-6


def test_separability_a_linear_control_solves_every_direction_a_global_mean_only_the_constant_one() -> None:
    directions = {(r, c): dct_direction(SIDE, r, c) for r, c in ((0, 0), (0, 3), (2, 5), (7, 7))}
    quick = SeparabilityRecipe(noise=1.0, train_samples=1000, test_samples=1000, epochs=4)  # the paper's optimiser, an easier task
    control = separability(lambda g: ScalarReadout(nn.Flatten(), PIXELS, g), directions, 1, seed=0, recipe=quick)
    assert min(control.values()) > 0.95, control
    mean_only = separability(lambda g: ScalarReadout(GlobalMean(), 1, g), directions, 1, seed=0, recipe=quick)
    assert mean_only[(0, 0)] > 0.95 and all(0.42 < mean_only[k] < 0.58 for k in directions if k != (0, 0)), mean_only


def test_nads_command_writes_directions_and_spectrum_and_refuses_bad_input(tmp_path: Path) -> None:
    out = tmp_path / "nads"
    assert run(["nads", "--backbone", "conv4", "--samples", "8", "--top", "4", "--out", str(out), "--separability",
                "--frequency-step", "27", "--epochs", "1", "--train-samples", "128", "--test-samples", "100"]) == 0  # fmt: skip
    assert {p.name for p in out.iterdir()} == {"nads.png", "spectrum.csv", "spectrum.png", "separability.csv", "separability.png"}
    assert (out / "separability.csv").read_text().splitlines()[0] == "row_frequency,column_frequency,accuracy,linear_control_accuracy"
    rows = (out / "spectrum.csv").read_text().splitlines()
    assert rows[0] == "channel,rank,eigenvalue" and len(rows) == 1 + 28 * 28
    assert run(["nads", "--samples", "1", "--out", str(out)]) == 2


def test_nads_command_is_reproducible_from_its_seed(tmp_path: Path) -> None:
    """Every initialisation's kernels come from the seed (layer constructors draw from the default
    generator, which the command seeds per initialisation), so two runs write the same numbers."""
    outputs = []
    for name in ("first", "second"):
        torch.manual_seed(len(name))  # a different global state each time: it must not matter
        assert run(["nads", "--backbone", "conv4", "--samples", "6", "--top", "2", "--out", str(tmp_path / name)]) == 0
        outputs.append((tmp_path / name / "spectrum.csv").read_text())
    assert outputs[0] == outputs[1]


def test_nads_command_refuses_bad_input_before_computing(tmp_path: Path, capsys) -> None:
    (tmp_path / "file").write_text("keep")
    for extra, message in (
        (["--out", str(tmp_path / "file")], "is a file; give a folder path"),
        (["--input-size", "8"], "--input-size 8 is too small for conv4's pooling; give a larger --input-size"),
        (["--separability", "--frequency-step", "0"], "--frequency-step must be >= 1"),
        (["--separability", "--epochs", "0"], "separability: samples, batch and epochs must be >= 1"),
    ):
        assert run(["nads", "--samples", "2", "--out", str(tmp_path / "out"), *extra]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and (tmp_path / "file").read_text() == "keep"

"""``--weights binary`` ({0,1} connectivity, straight-through) and ``--weights random-frozen`` (only BatchNorm trains)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn
import torch.nn.functional as F

from fewshot_nsl.backbones import build_backbone, resolve_similarity
from fewshot_nsl.backbones.weights import StraightThroughBinary, apply_weights
from fewshot_nsl.cli.main import run
from fewshot_nsl.config import RunConfig
from fewshot_nsl.data.roots import DATA_ENV
from fewshot_nsl.errors import UserError
from fewshot_nsl.learners import build_learner, recipe_columns
from fewshot_nsl.results import leaderboard
from tests.paired_runs import paired_gain
from tests.maml_helpers import make_episode


def test_a_binary_convolution_computes_with_its_zero_one_kernel_and_passes_the_hard_sigmoid_gradient() -> None:
    generator = torch.Generator().manual_seed(3)
    conv = apply_weights(nn.Sequential(nn.Conv2d(3, 5, 3, padding=1, bias=False)), "binary")[0]
    scores = torch.randn(5, 3, 3, 3, generator=generator)  # about a third beyond |s| = 1, where the gradient stops
    with torch.no_grad():
        conv.parametrizations.weight.original.copy_(scores)
    x = torch.randn(2, 3, 6, 6, generator=generator)
    upstream = torch.randn(2, 5, 6, 6, generator=generator)
    (conv(x) * upstream).sum().backward()

    kernel = (scores > 0).float()  # the reference: a plain convolution with the 0/1 kernel
    assert torch.equal(conv.weight, kernel)
    torch.testing.assert_close(conv(x), F.conv2d(x, kernel, padding=1), rtol=0, atol=0)
    kernel_gradient = torch.nn.grad.conv2d_weight(x, kernel.shape, upstream, padding=1)
    expected = kernel_gradient * 0.5 * (scores.abs() <= 1).float()  # d/ds of (clamp(s, -1, 1) + 1) / 2
    torch.testing.assert_close(conv.parametrizations.weight.original.grad, expected)
    assert ((scores.abs() > 1) & (expected == 0)).any() and (expected != 0).any()


def test_straight_through_is_differentiable_twice_for_second_order_maml() -> None:
    scores = torch.tensor([-2.0, -0.5, 0.5, 2.0], requires_grad=True)
    (gradient,) = torch.autograd.grad(StraightThroughBinary()(scores).square().sum(), scores, create_graph=True)
    torch.testing.assert_close(gradient, torch.tensor([0.0, 0.0, 1.0, 0.0]))  # 2 b · 1/2 inside, 0 outside
    assert gradient.requires_grad


def _protonet_steps(config: RunConfig, steps: int) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    learner = build_learner(config.resolve(), (1, 16, 16))
    initial = {name: p.detach().clone() for name, p in learner.named_parameters()}
    optimizer = torch.optim.Adam(learner.parameters(), lr=0.05)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        episode = make_episode(generator, 3, 2, 2, (1, 16, 16), torch.float32)
        optimizer.zero_grad()
        learner.fit(episode.support_images, episode.support_labels, 3)
        F.cross_entropy(learner(episode.query_images), episode.query_labels).backward()
        optimizer.step()
    return learner, initial


def test_binary_training_moves_the_latent_scores_and_flips_connections_while_kernels_stay_zero_one() -> None:
    learner, initial = _protonet_steps(RunConfig(width=8, weights="binary"), steps=5)
    latent = "backbone.features.4.parametrizations.weight.original"
    assert not torch.equal(learner.get_parameter(latent), initial[latent])
    kernel = learner.backbone.features[4].weight
    assert set(kernel.unique().tolist()) == {0.0, 1.0}
    assert not torch.equal(kernel, (initial[latent] > 0).float()), "no connection flipped"


def test_random_frozen_keeps_the_seeded_kernels_exactly_and_trains_batch_norm() -> None:
    learner, initial = _protonet_steps(RunConfig(width=8, weights="random-frozen"), steps=3)
    real, _ = _protonet_steps(RunConfig(width=8), steps=0)
    for name, parameter in learner.named_parameters():
        if parameter.dim() == 4:  # convolution weights: frozen, and the very kernels a real-weight run starts from
            assert not parameter.requires_grad and torch.equal(parameter, initial[name])
            assert torch.equal(parameter, real.get_parameter(name))
        else:  # BatchNorm affine parameters
            assert parameter.requires_grad and not torch.equal(parameter, initial[name]), name


def test_maml_neither_adapts_nor_meta_learns_frozen_kernels_and_reaches_binary_latent_scores() -> None:
    episode = make_episode(torch.Generator().manual_seed(2), 5, 1, 1, (1, 28, 28), torch.float32)
    for weights in ("random-frozen", "binary"):
        config = RunConfig(method="maml", dataset="omniglot", ways=5, shots=1, weights=weights).resolve()
        torch.manual_seed(0)
        learner = build_learner(config, (1, 28, 28)).train()
        learner.fit(episode.support_images, episode.support_labels, 5)
        F.cross_entropy(learner(episode.query_images), episode.query_labels).backward()
        kernels = [n for n, p in learner.backbone.named_parameters() if p.dim() == 4]
        assert len(kernels) == 4
        for name in kernels:
            parameter = learner.backbone.get_parameter(name)
            if weights == "random-frozen":
                assert parameter.grad is None and not any(name in adapted for adapted in learner.adapted_names)
            else:
                assert name.endswith("parametrizations.weight.original") and parameter.grad.abs().sum() > 0


def test_weight_options_are_refused_on_nsl_backbones_and_unknown_values_with_one_line_errors(capsys) -> None:
    with pytest.raises(UserError, match="plain backbones"):
        RunConfig(backbone="nsl-conv4", weights="binary").resolve()
    with pytest.raises(UserError, match="plain backbones"):
        build_backbone("nsl-conv4", (1, 28, 28), resolve_similarity("nsl-conv4", "dynamic"), weights="random-frozen")
    with pytest.raises(UserError, match="unknown --weights 'ternary'"):
        RunConfig(weights="ternary").resolve()
    assert run(["train", "--backbone", "nsl-resnet12", "--weights", "binary"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_resnet12_binarises_or_freezes_every_convolution_including_the_shortcuts() -> None:
    backbone = build_backbone("resnet12-512", (3, 16, 16), weights="binary")
    convolutions = [m for m in backbone.modules() if isinstance(m, nn.Conv2d)]
    assert len(convolutions) == 16  # 4 blocks x (3 + a 1x1 shortcut)
    assert all(set(m.weight.unique().tolist()) <= {0.0, 1.0} for m in convolutions)
    frozen = build_backbone("resnet12-512", (3, 16, 16), weights="random-frozen")
    trainable = {name for name, p in frozen.named_parameters() if p.requires_grad}
    assert len(trainable) == 2 * 16 and all(".weight" in n or ".bias" in n for n in trainable)  # the 16 BatchNorms
    assert all(isinstance(frozen.get_submodule(n.rsplit(".", 1)[0]), nn.BatchNorm2d) for n in trainable)


def test_recipes_and_leaderboard_tell_weight_options_apart() -> None:
    labels = {w: recipe_columns(RunConfig(weights=w).resolve()) for w in ("real", "binary", "random-frozen")}
    assert len({columns["recipe"] for columns in labels.values()}) == 3
    assert "weights:binary" in labels["binary"]["recipe"] and labels["random-frozen"]["weights"] == "random-frozen"
    # a real-weight recipe keeps the hash it had before the option existed
    assert labels["real"]["config_hash"] == recipe_columns(RunConfig().resolve())["config_hash"]
    old_row = pd.DataFrame([{"method": "protonet", "dataset": "omniglot", "acc": 0.9, "ci95": 0.01, "rank": 1}])
    rendered = leaderboard.render(old_row.reindex(columns=[c for c in leaderboard.COLUMNS if c != "weights"] + ["rank"]), "csv")
    assert pd.read_csv(__import__("io").StringIO(rendered))["weights"].tolist() == ["real"]


@pytest.mark.real_data
def test_binary_conv4_learns_omniglot_beyond_its_untrained_start_through_the_cli(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, real_omniglot_root: Path, real_cache_dir: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(DATA_ENV, str(real_omniglot_root))
    monkeypatch.setenv("FEWSHOT_NSL_CACHE", str(real_cache_dir))
    common = ["--weights", "binary", "--ways", "20", "--shots", "5", "--val-episodes", "20", "--no-progress"]
    assert run(["train", *common, "--episodes", "150", "--val-every", "150", "--run-dir", "runs/b"]) == 0
    # the same seeded network untrained: one Adam step of 1e-12 moves no latent score across 0
    assert run(["train", *common, "--episodes", "1", "--lr", "1e-12", "--run-dir", "runs/b0"]) == 0
    for run_dir in ("runs/b", "runs/b0"):
        assert run(["eval", "--run-dir", run_dir, "--ways", "5", "--shots", "1", "--episodes", "200", "--no-progress"]) == 0
    trained, untrained, gain = paired_gain(tmp_path, "runs/b", "runs/b0")
    assert trained["weights"] == "binary" and "weights:binary" in trained["recipe"]
    # 5-way 1-shot: the untrained {0,1} kernels already score about 47% (chance 20%); 150 iterations of learned
    # connectivity add about 6 points on the same episodes (real weights reach > 85% in 120,
    # tests/test_cli_end_to_end.py: connectivity alone learns, more slowly). The 95% CI of the paired gain excludes 0.
    assert gain.mean - gain.ci95 > 0, f"binary Conv-4 {trained['acc']:.3f} vs untrained {untrained['acc']:.3f}: gain {gain}"

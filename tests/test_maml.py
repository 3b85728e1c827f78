"""MAML on torch.func: meta-gradients, vectorisation, transductive BatchNorm, NSL backbones, errors.

Every random number comes from a seeded ``torch.Generator``; module weights
are redrawn from one after construction, so results never depend on the
global random state.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fewshot_nsl.config import RunConfig
from fewshot_nsl.engine.evaluator import EvalRequest, for_inference, select_manifest
from fewshot_nsl.episodes.episode import Episode
from fewshot_nsl.errors import UserError
from fewshot_nsl.learners.base import FewShotLearner
from fewshot_nsl.learners.maml import MAML, _batch_norm
from fewshot_nsl.learners.protonet import ProtoNet
from fewshot_nsl.nsl import DynamicNSLConv2d, StaticNSLConv2d

from tests.maml_helpers import (
    F64,
    TINY_IMAGE,
    TinyBackbone,
    assert_gradients_close,
    conv4,
    evaluate,
    make_episode,
    meta_gradient,
    meta_train,
    redraw_,
    tiny_learner,
)

# ----- meta-gradients ---------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize(
    "settings",
    [
        {"head": "learned"},
        {"head": "zero"},
        {"head": "learned", "meta_sgd": True},
        {"head": "zero", "meta_sgd": True, "anil": True},
    ],
    ids=["learned", "zero", "learned-metasgd", "zero-metasgd-anil"],
)
def test_second_order_meta_gradient_matches_finite_differences(steps: int, settings: dict) -> None:
    generator = torch.Generator().manual_seed(1)
    learner = tiny_learner(generator, inner_steps=steps, **settings)
    episodes = [make_episode(generator, 2, 2, 3, TINY_IMAGE) for _ in range(2)]
    _, analytic = meta_gradient(learner, episodes)

    eps = 1e-6
    for name, param in learner.named_parameters():
        numeric = torch.empty_like(param)
        flat, out = param.data.view(-1), numeric.view(-1)
        with torch.no_grad():
            for i in range(flat.numel()):
                original = flat[i].item()
                flat[i] = original + eps
                plus = learner.batch_loss(episodes).loss.item()
                flat[i] = original - eps
                minus = learner.batch_loss(episodes).loss.item()
                flat[i] = original
                out[i] = (plus - minus) / (2 * eps)
        torch.testing.assert_close(analytic[name], numeric, rtol=1e-6, atol=1e-8, msg=lambda m: f"{name}: {m}")


def reference_meta_gradient(
    layer: nn.Linear,
    head: nn.Linear,
    episodes: list[Episode],
    lr: float,
    steps: int,
    first_order: bool,
    inner_loss: str,
) -> list[torch.Tensor]:
    """MAML written out by hand with ``torch.autograd.grad``, for TinyBackbone + a learned head.

    Second order keeps ``create_graph=True``; first order restarts every
    inner step from detached tensors and takes the query gradient at the
    adapted parameters. The support loss is Finn et al.'s (summed
    cross-entropy divided by the shots) or the mean cross-entropy.
    """
    meta = [layer.weight, layer.bias, head.weight, head.bias]

    def loss(theta: list[torch.Tensor], images: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        features = torch.tanh(F.linear(images.flatten(1), theta[0], theta[1]))
        return F.cross_entropy(F.linear(features, theta[2], theta[3]), labels, reduction=reduction)

    def support_loss_of(theta: list[torch.Tensor], e: Episode) -> torch.Tensor:
        if inner_loss == "mean":
            return loss(theta, e.support_images, e.support_labels)
        shots = e.support_labels.numel() // e.ways
        return loss(theta, e.support_images, e.support_labels, reduction="sum") / shots

    total = [torch.zeros_like(p) for p in meta]
    for e in episodes:
        theta = [p.detach().requires_grad_() for p in meta] if first_order else list(meta)
        for _ in range(steps):
            support_loss = support_loss_of(theta, e)
            grads = torch.autograd.grad(support_loss, theta, create_graph=not first_order)
            theta = [t - lr * g for t, g in zip(theta, grads)]
            if first_order:
                theta = [t.detach().requires_grad_() for t in theta]
        query_grads = torch.autograd.grad(loss(theta, e.query_images, e.query_labels), theta if first_order else meta)
        total = [t + g / len(episodes) for t, g in zip(total, query_grads)]
    return total


@pytest.mark.parametrize("inner_loss", ["mean", "tf-sum"])
@pytest.mark.parametrize("first_order", [False, True], ids=["second-order", "first-order"])
@pytest.mark.parametrize("steps", [1, 3])
def test_meta_gradient_matches_hand_written_maml(first_order: bool, steps: int, inner_loss: str) -> None:
    generator = torch.Generator().manual_seed(2)
    learner = tiny_learner(generator, head="learned", inner_steps=steps, first_order=first_order, inner_loss=inner_loss)
    episodes = [make_episode(generator, 2, 3, 2, TINY_IMAGE) for _ in range(3)]
    _, got = meta_gradient(learner, episodes)
    layer, head = learner.backbone.layer, learner.head
    expected = reference_meta_gradient(layer, head, episodes, learner.inner_lr, steps, first_order, inner_loss)
    names = ["backbone.layer.weight", "backbone.layer.bias", "head.weight", "head.bias"]
    assert_gradients_close(got, dict(zip(names, expected)), rtol=1e-10, atol=1e-12)


def test_first_order_differs_from_second_order() -> None:
    """Guards against a first-order flag that silently does nothing (or the reverse)."""
    episodes = [make_episode(torch.Generator().manual_seed(3), 2, 2, 2, TINY_IMAGE)]
    second = meta_gradient(tiny_learner(torch.Generator().manual_seed(4), inner_steps=2), episodes)[1]
    first = meta_gradient(tiny_learner(torch.Generator().manual_seed(4), inner_steps=2, first_order=True), episodes)[1]
    assert not torch.allclose(first["backbone.layer.weight"], second["backbone.layer.weight"])


def test_anil_equals_meta_sgd_with_frozen_backbone_rates() -> None:
    """ANIL is Meta-SGD whose backbone rates are zero: same loss, same meta-gradient."""
    episodes = [make_episode(torch.Generator().manual_seed(5), 3, 2, 2, TINY_IMAGE) for _ in range(2)]
    anil = tiny_learner(torch.Generator().manual_seed(6), inner_steps=2, anil=True)
    frozen = tiny_learner(torch.Generator().manual_seed(6), inner_steps=2, meta_sgd=True)
    with torch.no_grad():
        for name, rate in frozen.inner_lrs.items():
            rate.fill_(0.0 if name.startswith("backbone") else frozen.inner_lr)
    loss_anil, grads_anil = meta_gradient(anil, episodes)
    loss_frozen, grads_frozen = meta_gradient(frozen, episodes)
    torch.testing.assert_close(loss_anil, loss_frozen)
    for name, g in grads_anil.items():
        torch.testing.assert_close(g, grads_frozen[name])


def test_meta_sgd_rates_start_at_inner_lr_and_are_learned() -> None:
    # Two steps: from the zero head the first step's backbone gradient is exactly zero.
    learner = tiny_learner(torch.Generator().manual_seed(7), meta_sgd=True, inner_lr=0.3, inner_steps=2)
    assert {name.replace("/", ".") for name in learner.inner_lrs} == set(learner.adapted_names)
    assert all(torch.all(rate == 0.3) for rate in learner.inner_lrs.values())
    episodes = [make_episode(torch.Generator().manual_seed(8), 4, 1, 2, TINY_IMAGE)]
    _, grads = meta_gradient(learner, episodes)
    assert all(grads[f"inner_lrs.{key}"].abs().sum() > 0 for key in learner.inner_lrs)


# ----- vectorised vs sequential ------------------------------------------------------


def sequential_forbidden(*args: object) -> None:
    raise AssertionError("the vectorised path fell back to the sequential one")


@pytest.mark.parametrize("first_order", [False, True], ids=["second-order", "first-order"])
def test_vectorised_equals_sequential_on_conv4(first_order: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    generator = torch.Generator().manual_seed(9)
    backbone = conv4(generator).to(F64)
    learner = MAML(backbone, inner_steps=2, first_order=first_order, meta_sgd=True, head="zero")
    episodes = [make_episode(generator, 5, 1, 2, (1, 16, 16)) for _ in range(3)]

    with monkeypatch.context() as patch:
        patch.setattr(learner, "_episode_outcome", sequential_forbidden)
        loss_v, grads_v = meta_gradient(learner, episodes)
    learner.vectorise = False
    loss_s, grads_s = meta_gradient(learner, episodes)

    torch.testing.assert_close(loss_v, loss_s, rtol=1e-5, atol=0)
    assert_gradients_close(grads_v, grads_s, rtol=1e-5, atol=1e-12)
    assert all(g.abs().sum() > 0 for g in grads_v.values())


def test_batch_loss_equals_fit_then_forward() -> None:
    """The fused ``batch_loss`` computes what the two-phase interface computes."""
    generator = torch.Generator().manual_seed(10)
    learner = tiny_learner(generator, inner_steps=2)
    episodes = [make_episode(generator, 3, 2, 4, TINY_IMAGE) for _ in range(3)]
    fused = learner.batch_loss(episodes)
    two_phase = FewShotLearner.batch_loss(learner, episodes)
    torch.testing.assert_close(fused.loss, two_phase.loss)
    assert fused.accuracy == two_phase.accuracy


def test_episodes_of_different_ways_fall_back_to_sequential() -> None:
    generator = torch.Generator().manual_seed(11)
    learner = tiny_learner(generator)
    episodes = [make_episode(generator, ways, 1, 2, TINY_IMAGE) for ways in (2, 5, 3)]
    result = learner.batch_loss(episodes)
    singles = [learner.batch_loss([e]) for e in episodes]
    torch.testing.assert_close(result.loss, torch.stack([s.loss for s in singles]).mean())
    hits = sum(s.accuracy * e.query_labels.numel() for s, e in zip(singles, episodes))
    assert result.accuracy == pytest.approx(hits / sum(e.query_labels.numel() for e in episodes))


# ----- BatchNorm, eval mode ----------------------------------------------------------


def test_batchnorm_is_transductive_and_tasks_do_not_leak() -> None:
    generator = torch.Generator().manual_seed(12)
    learner = MAML(conv4(generator), eval_inner_steps=2, head="zero")
    norms = [m for m in learner.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms and all(m.running_mean is None and m.running_var is None for m in norms)
    assert not any(m.track_running_stats for m in norms)

    task = make_episode(generator, 5, 1, 2, (1, 16, 16), torch.float32)
    others = [make_episode(generator, 5, 3, 4, (1, 16, 16), torch.float32) for _ in range(3)]

    def query_logits() -> torch.Tensor:
        learner.eval()
        with torch.no_grad():
            return learner.fit(task.support_images, task.support_labels, task.ways)(task.query_images)

    before = query_logits()
    with torch.no_grad():  # transductive: the queries are normalised with their own batch's statistics
        assert not torch.allclose(learner(task.query_images[:5]), before[:5])
    learner.train()
    learner.batch_loss(others).loss.backward()  # training-mode passes over other tasks, no optimiser step
    learner.eval()
    with torch.no_grad():
        learner.batch_loss(others)
    assert torch.equal(query_logits(), before)


@pytest.mark.parametrize("shape", [(6, 3), (6, 3, 5), (6, 3, 4, 4)])
@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_from_primitives_matches_torch(shape: tuple[int, ...], affine: bool) -> None:
    """The vmap-safe BatchNorm is F.batch_norm with batch statistics: same values, same gradients."""
    generator = torch.Generator().manual_seed(20)
    x = torch.randn(shape, generator=generator, dtype=F64, requires_grad=True)
    weight, bias = (torch.randn(3, generator=generator, dtype=F64, requires_grad=True) for _ in range(2))
    affine_params = (weight, bias) if affine else (None, None)
    probe = torch.randn(shape, generator=generator, dtype=F64)

    def outputs(norm: Callable[..., torch.Tensor]) -> list[torch.Tensor]:
        y = norm(x, None, None, *affine_params, True, 0.1, 1e-5)
        return [y, *torch.autograd.grad((y * probe).sum(), [x, *(p for p in affine_params if p is not None)])]

    for ours, theirs in zip(outputs(_batch_norm), outputs(F.batch_norm)):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)


def test_eval_adapts_under_no_grad_with_eval_inner_steps() -> None:
    generator = torch.Generator().manual_seed(13)
    learner = tiny_learner(generator, inner_steps=1, eval_inner_steps=3)
    task = make_episode(generator, 3, 2, 2, TINY_IMAGE)

    def logits() -> torch.Tensor:
        return learner.fit(task.support_images, task.support_labels, task.ways)(task.query_images)

    learner.eval()
    with torch.no_grad():
        under_no_grad = logits()
    with_grad = logits()
    assert not under_no_grad.requires_grad and not with_grad.requires_grad
    assert under_no_grad.abs().sum() > 0  # the zero head is all zeros until adapted
    torch.testing.assert_close(under_no_grad, with_grad, rtol=0, atol=0)

    learner.train()
    learner.inner_steps = 3  # BatchNorm-free backbone: train and eval differ only in steps
    torch.testing.assert_close(logits().detach(), under_no_grad)
    learner.inner_steps = 1
    assert not torch.allclose(logits().detach(), under_no_grad)


def test_meta_training_on_synthetic_tasks_improves_accuracy() -> None:
    """End to end: tasks are Gaussian clusters in the first two input dimensions; meta-training helps."""
    generator = torch.Generator().manual_seed(14)

    def cluster_task() -> Episode:
        centres = 2 * torch.randn(3, 4, generator=generator, dtype=F64)
        centres[:, 2:] = 0  # dimensions 2, 3 carry only noise; the backbone must learn to ignore them
        noise = torch.tensor([0.3, 0.3, 3.0, 3.0], dtype=F64)

        def draw(per_class: int) -> torch.Tensor:
            points = centres.repeat_interleave(per_class, 0)
            return (points + noise * torch.randn(points.shape, generator=generator, dtype=F64)).view(-1, *TINY_IMAGE)

        labels = torch.arange(3)
        return Episode(draw(1), labels, draw(10), labels.repeat_interleave(10), 3)

    learner = MAML(redraw_(TinyBackbone(features=8), generator), inner_lr=0.5, eval_inner_steps=1, head="zero")
    held_out = [cluster_task() for _ in range(50)]
    before = evaluate(learner, held_out)
    meta_train(learner, ([cluster_task() for _ in range(8)] for _ in range(30)), lr=0.02)
    after = evaluate(learner, held_out)
    assert after > before + 0.2, (before, after)  # measured: 0.47 -> 0.81


# ----- NSL backbones ------------------------------------------------------------------


NSL_LAYERS = {"static": StaticNSLConv2d, "dynamic": DynamicNSLConv2d}


def nsl_backbone(kind: str, form: str, generator: torch.Generator) -> nn.Module:
    """Two NSL conv-BN-ReLU-pool blocks on 1×8×8 images (no plain conv, so every layer is NSL)."""

    def layer(inputs: int, outputs: int) -> nn.Module:
        if kind == "static":
            return StaticNSLConv2d(inputs, outputs, 3, stride=1, padding=1, form=form)
        return DynamicNSLConv2d(inputs, outputs, 3, stride=1, padding=1, form=form, hidden=4)

    class TwoBlocks(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(
                layer(1, 4), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                layer(4, 4), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
            )  # fmt: skip
            self.out_features = 4 * 2 * 2

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return self.features(images).flatten(1)

    return redraw_(TwoBlocks(), generator)


@pytest.mark.parametrize(
    "kind,form", [("static", "diagonal"), ("static", "full"), ("dynamic", "diagonal"), ("dynamic", "full")]
)
def test_nsl_backbones_get_meta_gradients_everywhere(kind: str, form: str, monkeypatch: pytest.MonkeyPatch) -> None:
    generator = torch.Generator().manual_seed(15)
    # A learned head makes one inner step enough for second-order terms through every NSL layer
    # (from the zero head the first step's backbone gradient is zero), and keeps the test fast.
    backbone = nsl_backbone(kind, form, generator)
    learner = MAML(backbone, inner_steps=1, meta_sgd=True, head="learned", ways=2, generator=generator)
    episodes = [make_episode(generator, 2, 1, 2, (1, 8, 8), torch.float32) for _ in range(2)]

    with monkeypatch.context() as patch:
        patch.setattr(learner, "_episode_outcome", sequential_forbidden)
        loss_v, grads_v = meta_gradient(learner, episodes)
    learner.vectorise = False
    loss_s, grads_s = meta_gradient(learner, episodes)
    torch.testing.assert_close(loss_v, loss_s, rtol=1e-4, atol=1e-6)
    assert_gradients_close(grads_v, grads_s, rtol=1e-4, atol=1e-6)

    assert all(torch.isfinite(g).all() for g in grads_v.values())
    nsl_layers = {prefix: m for prefix, m in learner.named_modules() if isinstance(m, NSL_LAYERS[kind])}
    assert len(nsl_layers) == 2
    for prefix, module in nsl_layers.items():
        names = [name for name, _ in module.named_parameters()]
        # Static: the conv weight and the similarity M; dynamic: the weight and the meta-network's.
        assert "M" in names if kind == "static" else any(name.startswith("meta_") for name in names)
        for name in names:
            assert grads_v[f"{prefix}.{name}"].abs().sum() > 0, f"no meta-gradient reaches {prefix}.{name}"


def test_evaluation_keeps_static_nsl_unfolded_for_maml_and_folds_it_for_protonet() -> None:
    """MAML's inner loop adapts M, so the evaluator must hand it the layers as trained."""
    generator = torch.Generator().manual_seed(23)
    learner = MAML(nsl_backbone("static", "full", generator), inner_steps=2, head="learned", ways=2, generator=generator)
    with torch.no_grad():
        for module in learner.modules():
            if isinstance(module, StaticNSLConv2d):
                module.M.add_(0.1 * torch.randn(module.M.shape, generator=generator))
    episode = make_episode(generator, 2, 1, 3, (1, 8, 8), torch.float32)
    inference = for_inference(learner.eval())
    assert inference is learner and any(isinstance(m, StaticNSLConv2d) for m in inference.modules())
    logits = inference.fit(episode.support_images, episode.support_labels, 2)(episode.query_images)
    assert logits.shape == (6, 2) and torch.isfinite(logits).all()

    protonet = for_inference(ProtoNet(nsl_backbone("static", "full", generator)).eval())
    assert not any(isinstance(m, StaticNSLConv2d) for m in protonet.modules())


# ----- errors -------------------------------------------------------------------------


def test_learned_head_rejects_other_ways() -> None:
    generator = torch.Generator().manual_seed(16)
    learner = tiny_learner(generator, head="learned")  # 2-way
    episode = make_episode(generator, 3, 1, 1, TINY_IMAGE)
    with pytest.raises(ValueError, match="2-way.*3-way.*head='zero'"):
        learner.batch_loss([episode])
    with pytest.raises(ValueError, match="head='zero'"):
        learner.fit(episode.support_images, episode.support_labels, episode.ways)


@pytest.mark.parametrize(
    "settings,message",
    [
        ({"inner_steps": 0}, "inner_steps must be an int >= 1"),
        ({"eval_inner_steps": 0}, "eval_inner_steps must be an int >= 1"),
        ({"inner_steps": 1.5}, "inner_steps must be an int"),
        ({"inner_lr": 0.0}, "inner_lr must be a positive"),
        ({"inner_lr": float("nan")}, "inner_lr must be a positive"),
        ({"head": "random"}, "unknown MAML head"),
        ({"head": "learned"}, "needs the number of ways"),
    ],
)
def test_bad_settings_are_user_errors(settings: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        MAML(TinyBackbone(), **settings)


def test_backbone_without_out_features_is_rejected() -> None:
    with pytest.raises(UserError, match="out_features"):
        MAML(nn.Sequential(nn.Flatten(), nn.Linear(4, 3)))


def test_misuse_of_the_two_phases() -> None:
    learner = tiny_learner(torch.Generator().manual_seed(17))
    with pytest.raises(RuntimeError, match="call fit"):
        learner(torch.zeros(1, *TINY_IMAGE, dtype=F64))
    with pytest.raises(ValueError, match="at least one episode"):
        learner.batch_loss([])


@pytest.mark.parametrize("seed", [None, 18], ids=["default-generator", "given-generator"])
def test_learned_head_is_drawn_from_a_generator_only(seed: int | None) -> None:
    backbones = [TinyBackbone(), TinyBackbone()]
    state = torch.random.get_rng_state()

    def build(backbone: nn.Module) -> nn.Linear:
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        return MAML(backbone, head="learned", ways=2, generator=generator).head

    heads = [build(b) for b in backbones]
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(heads[0].weight, heads[1].weight) and torch.equal(heads[0].bias, heads[1].bias)


def test_zero_head_takes_each_episodes_ways() -> None:
    """``ways`` (passed by configs for every head) does not constrain the zero head."""
    generator = torch.Generator().manual_seed(19)
    learner = MAML(redraw_(TinyBackbone(), generator), ways=5, head="zero")
    episode = make_episode(generator, 3, 1, 2, TINY_IMAGE)
    assert learner.fit(episode.support_images, episode.support_labels, 3)(episode.query_images).shape == (6, 3)


def test_evaluating_a_learned_head_on_other_ways_is_refused_before_any_episode() -> None:
    config = RunConfig(method="maml", ways=20, shots=1).resolve()
    with pytest.raises(UserError, match="learned head scores 20-way episodes only, not 5-way: drop --ways, or score 5 ways with --head"):
        select_manifest(EvalRequest(Path("-"), ways=5), config, None)  # refused before the test split is looked at
    per_step_bn = config.updated({"per_step_bn": True})  # MAML++'s BatchNorm: no other head can score it
    with pytest.raises(UserError, match="only, not 5-way: drop --ways$"):
        select_manifest(EvalRequest(Path("-"), ways=5), per_step_bn, None)

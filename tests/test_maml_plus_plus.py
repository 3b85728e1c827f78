"""MAML++ switches (Antoniou et al. 2019): each changes what it should, and off is plain MAML."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fewshot_nsl.config import RunConfig, load_config
from fewshot_nsl.engine.trainer import learning_rate_schedule
from fewshot_nsl.errors import UserError
from fewshot_nsl.learners import MAML, MAMLPlusPlus, build_learner
from fewshot_nsl.learners.maml import multi_step_loss_weights
from tests.maml_helpers import F64, assert_gradients_close, conv4, make_episode, meta_gradient
from tests.test_maml_recipe import CONFIGS

IMAGE = (1, 16, 16)


def learner_with(seed: int, steps: int = 2, **settings) -> MAML:
    generator = torch.Generator().manual_seed(seed)
    return MAML(conv4(generator).to(F64), inner_steps=steps, ways=3, generator=generator, **settings).to(F64)


def episodes(seed: int, count: int = 2) -> list:
    return [make_episode(torch.Generator().manual_seed(seed + i), 3, 1, 2, IMAGE) for i in range(count)]


# ----- LSLR ---------------------------------------------------------------------------


def test_lslr_rates_are_per_layer_and_step_start_at_inner_lr_and_learn() -> None:
    learner = learner_with(40, steps=3, inner_lr=0.2, plus_plus=MAMLPlusPlus(lslr=True))
    assert {key.replace("/", ".") for key in learner.inner_lrs} == set(learner.adapted_names)
    assert all(rate.shape == (3,) and torch.all(rate == 0.2) for rate in learner.inner_lrs.values())
    _, grads = meta_gradient(learner, episodes(41))
    for key in learner.inner_lrs:
        assert torch.all(grads[f"inner_lrs.{key}"] != 0), f"LSLR rates of {key} get no meta-gradient at some step"


def test_lslr_at_its_initial_rates_is_plain_maml_and_each_step_uses_its_own_rate() -> None:
    batch = episodes(42)
    plain_loss, plain_grads = meta_gradient(learner_with(43, inner_lr=0.2), batch)
    lslr = learner_with(43, inner_lr=0.2, plus_plus=MAMLPlusPlus(lslr=True))
    loss, grads = meta_gradient(lslr, batch)
    torch.testing.assert_close(loss, plain_loss, rtol=1e-12, atol=0)
    assert_gradients_close({n: g for n, g in grads.items() if not n.startswith("inner_lrs.")}, plain_grads, 1e-10, 1e-14)

    with torch.no_grad():  # second step's rates to zero: the same as one plain inner step
        for rate in lslr.inner_lrs.values():
            rate[1] = 0.0
    one_step = learner_with(43, steps=1, inner_lr=0.2)
    torch.testing.assert_close(lslr.batch_loss(batch).loss, one_step.batch_loss(batch).loss, rtol=1e-12, atol=0)


def test_meta_sgd_and_lslr_are_exclusive() -> None:
    with pytest.raises(UserError, match="Meta-SGD.*LSLR"):
        learner_with(44, meta_sgd=True, plus_plus=MAMLPlusPlus(lslr=True))


# ----- per-step BatchNorm -------------------------------------------------------------


def test_per_step_bn_uses_step_indexed_weights_that_are_meta_learned_not_adapted() -> None:
    learner = learner_with(45, steps=2, eval_inner_steps=2, plus_plus=MAMLPlusPlus(per_step_bn=True))
    tables = learner._step_norm_tables()
    assert len(tables) == 8  # weight and bias of Conv-4's four BatchNorm layers
    assert all(t.shape[0] == 3 for t in tables.values())  # steps 0, 1 and the query pass after step 2
    assert not any(name.removeprefix("backbone.") in tables for name in learner.adapted_names)
    assert all(not p.requires_grad for n, p in learner.backbone.named_parameters() if n in tables)

    _, grads = meta_gradient(learner, episodes(46))
    for key in learner.step_norms:
        rows = grads[f"step_norms.{key}"].abs().sum(dim=1)
        assert torch.all(rows > 0), f"{key}: a step's BatchNorm row gets no meta-gradient ({rows})"

    # Step s uses row s: changing only the last row changes the query logits, not the adaptation.
    batch = episodes(47, 1)[0]
    learner.eval()
    before = learner.fit(batch.support_images, batch.support_labels, 3)
    adapted_before = {k: v.clone() for k, v in learner._adapted.items()}
    logits_before = before(batch.query_images)
    with torch.no_grad():
        next(iter(learner.step_norms.values()))[2].add_(0.5)
    learner.fit(batch.support_images, batch.support_labels, 3)
    for name, value in learner._adapted.items():
        torch.testing.assert_close(value, adapted_before[name], rtol=0, atol=0)
    assert not torch.allclose(learner(batch.query_images), logits_before)


def test_per_step_bn_with_equal_rows_equals_maml_that_does_not_adapt_batchnorm() -> None:
    """Independent check: plain MAML whose BatchNorm parameters are fixed in the inner loop."""
    batch = episodes(48)
    per_step = learner_with(49, plus_plus=MAMLPlusPlus(per_step_bn=True))
    reference = learner_with(49)
    norms = {n for n, m in reference.backbone.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    reference.adapted_names = tuple(
        n for n in reference.adapted_names if n.removeprefix("backbone.").rsplit(".", 1)[0] not in norms
    )
    torch.testing.assert_close(per_step.batch_loss(batch).loss, reference.batch_loss(batch).loss, rtol=1e-12, atol=0)


# ----- multi-step loss ----------------------------------------------------------------


def test_multi_step_loss_weights_follow_maml_plus_plus() -> None:
    assert multi_step_loss_weights(5, 0, 5000) == pytest.approx([0.2] * 5)
    halfway = multi_step_loss_weights(5, 2500, 5000)
    assert halfway == pytest.approx([0.1] * 4 + [0.6]) and sum(halfway) == pytest.approx(1.0)
    near_end = multi_step_loss_weights(5, 4999, 5000)
    assert near_end == pytest.approx([0.03 / 5] * 4 + [1 - 4 * 0.03 / 5])  # floor and cap
    assert multi_step_loss_weights(5, 5000, 5000) == [0.0] * 4 + [1.0]


def test_multi_step_loss_is_the_weighted_sum_of_per_step_query_losses() -> None:
    batch = episodes(50, 1)
    msl = learner_with(51, steps=3, plus_plus=MAMLPlusPlus(multi_step_loss=True, msl_anneal_iterations=100))
    msl.set_iteration(25)
    weights = multi_step_loss_weights(3, 25, 100)
    expected = 0.0
    for steps, weight in zip((1, 2, 3), weights):
        plain = learner_with(51, steps=steps)
        logits = plain.fit(batch[0].support_images, batch[0].support_labels, 3)(batch[0].query_images)
        expected = expected + weight * F.cross_entropy(logits, batch[0].query_labels)
    torch.testing.assert_close(msl.batch_loss(batch).loss, expected, rtol=1e-12, atol=0)

    msl.set_iteration(100)  # annealed: plain MAML
    torch.testing.assert_close(msl.batch_loss(batch).loss, learner_with(51, steps=3).batch_loss(batch).loss)
    msl.eval()  # evaluation scores the final step only
    msl.set_iteration(0)
    plain = learner_with(51, steps=3, eval_inner_steps=3).eval()
    torch.testing.assert_close(msl.batch_loss(batch).loss, plain.batch_loss(batch).loss)


# ----- first-to-second-order annealing ------------------------------------------------


def test_first_order_until_switches_to_second_order() -> None:
    batch = episodes(52)
    annealed = learner_with(53, plus_plus=MAMLPlusPlus(first_order_until=3))
    first = meta_gradient(learner_with(53, first_order=True), batch)[1]
    second = meta_gradient(learner_with(53), batch)[1]
    for iteration, expected in ((0, first), (2, first), (3, second), (10, second)):
        annealed.set_iteration(iteration)
        assert_gradients_close(meta_gradient(annealed, batch)[1], expected, rtol=1e-12, atol=0)


# ----- cosine annealing of the meta learning rate ------------------------------------


def test_cosine_schedule_anneals_from_lr_to_min_lr() -> None:
    config = RunConfig(method="maml", lr=1e-3, lr_schedule="cosine", min_lr=1e-5, episodes=100).resolve()
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimiser = torch.optim.Adam([parameter], lr=config.lr)
    schedule = learning_rate_schedule(optimiser, config)
    rates = [optimiser.param_groups[0]["lr"]]
    for _ in range(100):
        optimiser.step()
        schedule.step()
        rates.append(optimiser.param_groups[0]["lr"])
    for t in (0, 25, 50, 100):
        assert rates[t] == pytest.approx(1e-5 + (1e-3 - 1e-5) * (1 + math.cos(math.pi * t / 100)) / 2)
    constant = learning_rate_schedule(torch.optim.Adam([parameter], lr=1e-3), RunConfig(method="maml").resolve())
    assert constant.get_last_lr() == [1e-3]


def test_maml_plus_plus_config_builds_every_switch() -> None:
    config = load_config(CONFIGS / "maml++-conv4-omniglot.yaml").resolve()
    assert (config.meta_batch, config.inner_steps, config.eval_inner_steps, config.inner_lr, config.inner_loss) == (
        8, 5, 5, 0.1, "mean",
    )  # fmt: skip
    assert (config.lr_schedule, config.min_lr, config.msl_anneal_iterations, config.episodes) == ("cosine", 1e-5, 5000, 50000)
    learner = build_learner(config, (1, 28, 28))
    assert learner.plus_plus.enabled() == ("bnwb", "lslr", "msl")

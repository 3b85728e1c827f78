"""MAML as Finn et al. published it: default recipes, per-task backward, the learned head, stale adaptations."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from fewshot_nsl.config import RunConfig, load_config
from fewshot_nsl.learners import MAML, build_learner, recipe_columns
from fewshot_nsl.learners.base import FewShotLearner
from tests.maml_helpers import F64, assert_gradients_close, conv4, make_episode, meta_gradient

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# Finn et al. (2017), Appendix A.1, and github.com/cbfinn/maml (main.py): written out here
# independently of fewshot_nsl.config.maml_recipe, field by field.
# Network: Omniglot strided convolutions + mean pooling + N(0, 1) head; Mini-ImageNet max-pooling + Glorot head.
OMNIGLOT_NET = {"conv4_downsample": "stride", "head_init": "normal"}
MINI_NET = {"conv4_downsample": "maxpool", "head_init": "xavier"}
FINN = {
    ("omniglot", 5, 1): {"meta_batch": 32, "inner_steps": 1, "eval_inner_steps": 3, "inner_lr": 0.4, "width": 64, "queries": 1} | OMNIGLOT_NET,
    ("omniglot", 20, 1): {"meta_batch": 16, "inner_steps": 5, "eval_inner_steps": 5, "inner_lr": 0.1, "width": 64, "queries": 1} | OMNIGLOT_NET,
    ("miniimagenet", 5, 1): {"meta_batch": 4, "inner_steps": 5, "eval_inner_steps": 10, "inner_lr": 0.01, "width": 32, "queries": 15} | MINI_NET,
    ("miniimagenet", 5, 5): {"meta_batch": 2, "inner_steps": 5, "eval_inner_steps": 10, "inner_lr": 0.01, "width": 32, "queries": 15} | MINI_NET,
}  # fmt: skip
COMMON = {"head": "learned", "inner_loss": "mean", "lr": 1e-3, "lr_schedule": "constant", "first_order": False,
          "meta_sgd": False, "anil": False, "per_step_bn": False, "lslr": False, "multi_step_loss": False,
          "first_order_until": 0}  # fmt: skip
SHIPPED = {
    "maml-conv4-omniglot.yaml": ("omniglot", 5, 1),
    "maml-conv4-omniglot-20way.yaml": ("omniglot", 20, 1),
    "maml-conv4-miniimagenet.yaml": ("miniimagenet", 5, 1),
    "maml-conv4-miniimagenet-5shot.yaml": ("miniimagenet", 5, 5),
}


def assert_recipe(config: RunConfig, dataset: str, ways: int, shots: int) -> None:
    expected = FINN[(dataset, ways, shots)] | COMMON | {"dataset": dataset, "ways": ways, "shots": shots}
    for field, value in expected.items():
        assert getattr(config, field) == value, f"{dataset} {ways}w{shots}s: {field} = {getattr(config, field)!r}, published {value!r}"


@pytest.mark.parametrize("task", list(FINN), ids=lambda t: f"{t[0]}-{t[1]}w{t[2]}s")
def test_defaults_resolve_to_the_published_recipe(task: tuple[str, int, int]) -> None:
    dataset, ways, shots = task
    assert_recipe(RunConfig(method="maml", dataset=dataset, ways=ways, shots=shots).resolve(), dataset, ways, shots)


@pytest.mark.parametrize("name", list(SHIPPED))
def test_shipped_maml_configs_are_the_published_recipe_and_build_it(name: str) -> None:
    config = load_config(CONFIGS / name).resolve()
    dataset, ways, shots = SHIPPED[name]
    assert_recipe(config, dataset, ways, shots)
    assert config.episodes == 60000
    image_shape = (1, 28, 28) if dataset == "omniglot" else (3, 84, 84)
    learner = build_learner(config, image_shape)
    assert isinstance(learner, MAML)
    assert learner.head is not None and tuple(learner.head.weight.shape) == (ways, learner.backbone.out_features)
    assert (learner.inner_lr, learner.inner_steps, learner.eval_inner_steps) == (
        config.inner_lr, config.inner_steps, config.eval_inner_steps,
    )  # fmt: skip
    assert learner.inner_loss == "mean" and not learner.first_order and not learner.plus_plus.enabled()
    # Conv-4 feature width: 64 on 28x28 Omniglot (mean of the final 2x2 map); 32 filters x 5 x 5 = 800 on
    # 84x84 Mini-ImageNet (as Finn et al.)
    assert learner.backbone.out_features == (64 if dataset == "omniglot" else 800)
    pools = [m for m in learner.backbone.modules() if isinstance(m, torch.nn.MaxPool2d)]
    strides = [m.stride for m in learner.backbone.modules() if isinstance(m, torch.nn.Conv2d)]
    if dataset == "omniglot":
        assert not pools and strides == [(2, 2)] * 4
        assert learner.backbone(torch.zeros(2, 1, 28, 28)).shape == (2, 64)
        assert learner.backbone.features(torch.zeros(2, 1, 28, 28)).shape == (2, 64, 2, 2)  # 28 -> 14 -> 7 -> 4 -> 2
    else:
        assert len(pools) == 4 and strides == [(1, 1)] * 4


def test_user_settings_override_the_recipe() -> None:
    config = RunConfig(method="maml", ways=5, shots=1, inner_lr=0.1, queries=15, head="zero").resolve()
    assert (config.inner_lr, config.queries, config.head, config.meta_batch) == (0.1, 15, "zero", 32)


def test_leaderboard_recipe_tells_maml_variants_apart() -> None:
    base = RunConfig(method="maml", ways=5, shots=1).resolve()
    variants = [
        base,
        RunConfig(method="maml", ways=5, shots=1, head="zero").resolve(),
        RunConfig(method="maml", ways=5, shots=1, first_order=True).resolve(),
        RunConfig(method="maml", ways=5, shots=1, inner_steps=2).resolve(),
        RunConfig(method="maml", ways=5, shots=1, inner_lr=0.1).resolve(),
        RunConfig(method="maml", ways=5, shots=1, meta_batch=16).resolve(),
        RunConfig(method="maml", ways=5, shots=1, lslr=True).resolve(),
        RunConfig(method="maml", ways=5, shots=1, lr_schedule="cosine").resolve(),
        RunConfig(method="maml", ways=5, shots=1, inner_loss="tf-sum").resolve(),
    ]
    labels = [recipe_columns(c)["recipe"] for c in variants]
    readable = [label.rsplit(" [", 1)[0] for label in labels]  # without the config hash
    assert len(set(readable)) == len(readable), readable
    # what the readable part leaves out (here the meta learning rate) is told apart by the hash
    other_lr = recipe_columns(RunConfig(method="maml", ways=5, shots=1, lr=5e-4).resolve())["recipe"]
    assert other_lr.rsplit(" [", 1)[0] == readable[0] and other_lr != labels[0]
    assert labels[0].endswith(f"[{recipe_columns(base)['config_hash']}]")
    columns = recipe_columns(base)
    assert (columns["maml_head"], columns["inner_steps"], columns["eval_inner_steps"], columns["inner_lr"],
            columns["maml_order"], columns["meta_batch"]) == ("learned", 1, 3, 0.4, "second", 32)  # fmt: skip


# ----- per-task backward ---------------------------------------------------------------


def learned_conv4_learner(seed: int, **settings) -> MAML:
    generator = torch.Generator().manual_seed(seed)
    return MAML(conv4(generator).to(F64), ways=5, generator=generator, **settings).to(F64)


def accumulated_gradients(learner: MAML, episodes: list) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    learner.zero_grad(set_to_none=True)
    result = learner.backward_batch(episodes)
    grads = {name: p.grad.clone() for name, p in learner.named_parameters() if p.grad is not None}
    learner.zero_grad(set_to_none=True)
    return result.loss, grads


@pytest.mark.parametrize("first_order", [False, True], ids=["second-order", "first-order"])
def test_per_task_backward_and_vmap_equal_the_all_at_once_meta_gradient(first_order: bool) -> None:
    learner = learned_conv4_learner(30, inner_steps=2, first_order=first_order, vectorise=False)
    episodes = [make_episode(torch.Generator().manual_seed(31 + i), 5, 1, 1, (1, 16, 16)) for i in range(4)]
    loss_all, grads_all = meta_gradient(learner, episodes)  # one graph for the whole meta-batch

    loss_seq, grads_seq = accumulated_gradients(learner, episodes)
    learner.vectorise = True
    loss_vec, grads_vec = accumulated_gradients(learner, episodes)

    for loss, grads in ((loss_seq, grads_seq), (loss_vec, grads_vec)):
        torch.testing.assert_close(loss, loss_all, rtol=1e-12, atol=0)
        assert_gradients_close(grads, grads_all, rtol=1e-9, atol=1e-13)
    assert all(g.abs().sum() > 0 for g in grads_all.values())


def test_sequential_backward_frees_each_tasks_graph_before_the_next_task() -> None:
    """Peak memory is one task's graph: task i's saved tensors are gone when task i+1 starts."""
    learner = learned_conv4_learner(32, vectorise=False)
    episodes = [make_episode(torch.Generator().manual_seed(33 + i), 5, 1, 1, (1, 16, 16)) for i in range(3)]
    outcome = learner._episode_outcome
    previous: list[torch.Tensor] = []

    def checked(episode):
        if previous:
            with pytest.raises(RuntimeError, match="backward through the graph a second time"):
                torch.autograd.grad(previous[-1], list(learner.parameters()), allow_unused=True)
        loss, hits = outcome(episode)
        previous.append(loss)
        return loss, hits

    learner._episode_outcome = checked
    learner.backward_batch(episodes)
    assert len(previous) == 3


def test_learned_head_adapts_the_backbone_in_one_step_and_orders_differ() -> None:
    """The zero head's failure mode: with it, one inner step gives the backbone a zero gradient."""
    episode = make_episode(torch.Generator().manual_seed(34), 5, 1, 1, (1, 16, 16))
    for head, nonzero in (("learned", True), ("zero", False)):
        learner = learned_conv4_learner(35, head=head)
        params, rates = learner._start(5, episode.support_images)
        fast, fixed = learner._split(params)
        inner = torch.func.grad(learner._support_loss)(fast, fixed, episode.support_images, episode.support_labels, 0)
        backbone_norm = sum(float(g.detach().abs().sum()) for name, g in inner.items() if name.startswith("backbone."))
        assert (backbone_norm > 0) == nonzero, f"{head} head: backbone inner-gradient norm {backbone_norm}"

    second = meta_gradient(learned_conv4_learner(35), [episode])[1]
    first = meta_gradient(learned_conv4_learner(35, first_order=True), [episode])[1]
    for name in ("backbone.features.0.weight", "backbone.features.12.weight", "head.weight"):
        assert not torch.allclose(second[name], first[name], rtol=1e-6, atol=1e-10), name


# ----- the two phases -----------------------------------------------------------------


def test_forward_without_a_fit_for_the_current_state_is_refused() -> None:
    learner = learned_conv4_learner(36)
    episode = make_episode(torch.Generator().manual_seed(37), 5, 1, 2, (1, 16, 16))
    support, labels, queries = episode.support_images, episode.support_labels, episode.query_images
    with pytest.raises(RuntimeError, match="call fit"):
        learner(queries)

    learner.eval()
    logits = learner.fit(support, labels, 5)(queries)
    torch.testing.assert_close(learner(queries), logits)  # scoring twice after one fit is fine

    learner.train()  # the mode changed: the adaptation is stale
    with pytest.raises(RuntimeError, match="call fit"):
        learner(queries)

    learner.fit(support, labels, 5)
    optimiser = torch.optim.SGD(learner.parameters(), lr=0.1)
    learner(queries).sum().backward()
    optimiser.step()  # the meta-parameters changed: stale
    with pytest.raises(RuntimeError, match="call fit"):
        learner(queries)

    learner.fit(support, labels, 5)
    learner.batch_loss([episode])  # another task ran through the learner: stale
    with pytest.raises(RuntimeError, match="call fit"):
        learner(queries)


def test_trainer_interface_default_backward_batch_matches_batch_loss() -> None:
    """Learners without their own ``backward_batch`` accumulate exactly ``batch_loss``'s gradient."""
    learner = learned_conv4_learner(38, vectorise=False)
    episodes = [make_episode(torch.Generator().manual_seed(39 + i), 5, 1, 1, (1, 16, 16)) for i in range(2)]
    loss_all, grads_all = meta_gradient(learner, episodes)
    learner.zero_grad(set_to_none=True)
    result = FewShotLearner.backward_batch(learner, episodes)
    torch.testing.assert_close(result.loss, loss_all)
    assert not result.loss.requires_grad
    assert_gradients_close({n: p.grad for n, p in learner.named_parameters()}, grads_all, rtol=1e-12, atol=0)


@pytest.mark.parametrize(
    "task,expected",
    [(("omniglot", 5, 1), True), (("omniglot", 20, 1), True), (("miniimagenet", 5, 1), False), (("omniglot", 5, 5), False)],
    ids=["omniglot-5w1s", "omniglot-20w1s", "mini-5w1s", "omniglot-5w5s"],
)
def test_cpu_vectorises_only_the_tiny_tasks_where_vmap_was_measured_faster(task: tuple, expected: bool) -> None:
    dataset, ways, shots = task
    config = RunConfig(method="maml", dataset=dataset, ways=ways, shots=shots, device="cpu").resolve()
    assert config.vectorise is expected
    assert RunConfig(method="maml", dataset=dataset, ways=ways, shots=shots, vectorise=not expected).resolve().vectorise is (not expected)


def test_head_initialisations_follow_their_sources() -> None:
    backbone = conv4(torch.Generator().manual_seed(1), width=8)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    heads = {
        init: MAML(backbone, ways=20, head_init=init, generator=torch.Generator().manual_seed(3)).head
        for init in ("uniform", "normal", "xavier")
    }
    assert torch.equal(torch.get_rng_state(), before)  # drawn from the named generator only
    features = backbone.out_features
    # uniform: PyTorch's nn.Linear default, weight then bias from U(-1/sqrt(D), 1/sqrt(D)), in that order
    generator, bound = torch.Generator().manual_seed(3), features**-0.5
    expected_weight = torch.empty(20, features).uniform_(-bound, bound, generator=generator)
    expected_bias = torch.empty(20).uniform_(-bound, bound, generator=generator)
    assert torch.equal(heads["uniform"].weight, expected_weight) and torch.equal(heads["uniform"].bias, expected_bias)
    # normal: Finn et al.'s Omniglot head, N(0, 1) weights, zero bias
    weight = heads["normal"].weight.detach()
    assert abs(float(weight.mean())) < 0.15 and 0.85 < float(weight.std()) < 1.15
    assert not heads["normal"].bias.any()
    # xavier: Glorot uniform, bound sqrt(6 / (fan_in + fan_out)), zero bias
    glorot = (6 / (features + 20)) ** 0.5
    weight = heads["xavier"].weight.detach()
    assert float(weight.abs().max()) <= glorot and float(weight.abs().max()) > 0.9 * glorot
    assert not heads["xavier"].bias.any()


def test_run_directories_from_before_finns_network_load_as_they_were_trained(tmp_path: Path) -> None:
    from fewshot_nsl.api import load_trained
    from fewshot_nsl.engine.checkpoint import read_config

    # a run directory of that time: the resolved config without the new keys, a checkpoint without an image shape
    then = RunConfig(method="maml", ways=5, shots=1, conv4_downsample="maxpool", head_init="uniform").resolve()
    saved = {k: v for k, v in then.to_dict().items() if k not in ("conv4_downsample", "head_init")}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    config = read_config(tmp_path).resolve()
    assert (config.conv4_downsample, config.head_init) == ("maxpool", "uniform")
    weights = build_learner(then, (1, 28, 28)).state_dict()
    torch.save({"model": weights, "config": saved, "version": "0.1.0"}, tmp_path / "best.pt")
    run = load_trained(tmp_path, device="cpu")  # load_run's model check, rebuild, load
    assert any(isinstance(m, torch.nn.MaxPool2d) for m in run.learner.modules())
    assert run.preprocess.channels == 1 and run.preprocess.image_size == 28
    fresh = RunConfig(method="maml", ways=5, shots=1).resolve()
    assert (fresh.conv4_downsample, fresh.head_init) == ("stride", "normal")
    assert "strided-conv4 learned-head(normal)" in recipe_columns(fresh)["recipe"]
    plus_plus = load_config(CONFIGS / "maml++-conv4-omniglot.yaml").resolve()
    assert (plus_plus.conv4_downsample, plus_plus.head_init) == ("maxpool", "xavier")  # MAML++'s own network

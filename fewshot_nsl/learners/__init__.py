"""Few-shot learners behind the two-phase interface of ``base.FewShotLearner``."""

from __future__ import annotations

import torch

from fewshot_nsl.backbones import build_backbone, resolve_similarity
from fewshot_nsl.config import RunConfig
from fewshot_nsl.learners.base import BatchResult, FewShotLearner
from fewshot_nsl.learners.maml import MAML, MAMLPlusPlus
from fewshot_nsl.learners.protonet import ProtoNet


def maml_plus_plus(config: RunConfig) -> MAMLPlusPlus:
    """The learner-side MAML++ switches a config asks for."""
    return MAMLPlusPlus(
        per_step_bn=config.per_step_bn,
        lslr=config.lslr,
        multi_step_loss=config.multi_step_loss,
        msl_anneal_iterations=config.msl_anneal_iterations,
        first_order_until=config.first_order_until,
    )


def recipe_columns(config: RunConfig) -> dict[str, object]:
    """What tells two trainings apart beyond method and backbone: the leaderboard records all of it.

    ``recipe`` is a readable summary, e.g. ``5w1s1q mb32 learned-head 1/3 steps a=0.4 2nd-order``
    (MAML++ switches appended, ``ca`` for the cosine meta learning rate).
    """
    columns: dict[str, object] = {
        "train_ways": config.ways, "train_shots": config.shots, "train_queries": config.queries,
        "meta_batch": config.meta_batch, "lr_schedule": config.lr_schedule,
    }  # fmt: skip
    label = f"{config.ways}w{config.shots}s{config.queries}q mb{config.meta_batch}"
    if config.method == "maml":
        order = "first" if config.first_order else "second"
        switches = list(maml_plus_plus(config).enabled()) + (["ca"] if config.lr_schedule == "cosine" else [])
        columns |= {
            "maml_head": config.head, "inner_steps": config.inner_steps, "eval_inner_steps": config.eval_inner_steps,
            "inner_lr": config.inner_lr, "inner_loss": config.inner_loss, "maml_order": order, "maml_plus_plus": "+".join(switches) or "none",
        }  # fmt: skip
        label += f" {config.head}-head {config.inner_steps}/{config.eval_inner_steps} steps a={config.inner_lr}"
        label += f" {config.inner_loss}-loss {order}-order"
        label += "".join(f" {flag}" for flag, on in (("meta-sgd", config.meta_sgd), ("anil", config.anil)) if on)
        label += f" maml++:{'+'.join(switches)}" if switches else ""
    return columns | {"recipe": label}


def build_learner(config: RunConfig, image_shape: tuple[int, int, int]) -> FewShotLearner:
    """Backbone + learner from a resolved config; the only place both meet."""
    similarity = resolve_similarity(config.backbone, config.similarity, config.nsl_form, config.nsl_hidden)
    backbone = build_backbone(
        config.backbone,
        image_shape,
        similarity=similarity,
        width=config.width or 64,
        plain_stem=config.plain_stem,
        drop_rate=config.drop_rate,
    )
    if config.method == "protonet":
        return ProtoNet(backbone, distance=config.distance)
    return MAML(
        backbone,
        inner_lr=config.inner_lr,
        inner_steps=config.inner_steps,
        eval_inner_steps=config.eval_inner_steps,
        first_order=config.first_order,
        meta_sgd=config.meta_sgd,
        anil=config.anil,
        head=config.head,
        ways=config.ways,
        vectorise=bool(config.vectorise),
        inner_loss=config.inner_loss,
        plus_plus=maml_plus_plus(config),
        generator=torch.Generator().manual_seed(config.seed),
    )


__all__ = ["MAML", "MAMLPlusPlus", "maml_plus_plus", "recipe_columns", "BatchResult", "FewShotLearner", "ProtoNet", "build_learner"]

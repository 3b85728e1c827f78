"""Few-shot learners behind the two-phase interface of ``base.FewShotLearner``."""

from __future__ import annotations

import torch

from fewshot_nsl.backbones import build_backbone, resolve_similarity
from fewshot_nsl.config import RunConfig
from fewshot_nsl.learners.base import BatchResult, FewShotLearner
from fewshot_nsl.learners.maml import MAML
from fewshot_nsl.learners.protonet import ProtoNet


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
        generator=torch.Generator().manual_seed(config.seed),
    )


__all__ = ["MAML", "BatchResult", "FewShotLearner", "ProtoNet", "build_learner"]

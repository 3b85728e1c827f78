"""Few-shot learners behind the two-phase interface of ``base.FewShotLearner``."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from fewshot_nsl.backbones import build_backbone, resolve_similarity
from fewshot_nsl.config import RunConfig
from fewshot_nsl.data.augment import Augmentation
from fewshot_nsl.learners.base import BatchResult, FewShotLearner
from fewshot_nsl.learners.exemplar import ExemplarCNN
from fewshot_nsl.learners.maml import MAML, MAMLPlusPlus
from fewshot_nsl.learners.protonet import ProtoNet
from fewshot_nsl.nsl import use_pytorch_path


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

    ``recipe`` is a readable summary, e.g. ``5w1s1q mb32 6000it strided-conv4 learned-head(normal) 1/3
    steps a=0.4 mean-loss second-order [e27e8bfc32db]`` (``train+val``, augmentation, ``nsl-pytorch-ops``,
    MAML++ switches and ``ca`` for a cosine meta learning rate appended when used), ending with ``config_hash``, which
    fingerprints every recipe field (all but seed, paths and device), so no two different recipes share
    a label.
    """
    columns: dict[str, object] = {
        "train_ways": config.ways, "train_shots": config.shots, "train_queries": config.queries,
        "meta_batch": config.meta_batch, "lr_schedule": config.lr_schedule, "train_on_val": config.train_on_val,
        "nsl_kind": config.similarity or ("static" if config.backbone.startswith("nsl-") else "conv"),
        "nsl_form": config.nsl_form if config.backbone.startswith("nsl-") else None,
        "nsl_hidden": config.nsl_hidden if config.similarity == "dynamic" else None,
        "augmentation": augmentation_label(config),
        "conv4_downsample": config.conv4_downsample if config.backbone.endswith("conv4") else None,
        "weights": config.weights,
        "config_hash": recipe_hash(config),
    }  # fmt: skip
    label = f"{config.ways}w{config.shots}s{config.queries}q mb{config.meta_batch} {config.episodes}it"
    if config.method == "exemplar":
        columns |= {"surrogate_classes": config.surrogate_classes, "samples_per_class": config.samples_per_class}
        label = f"exemplar {config.surrogate_classes}x{config.samples_per_class} batch{config.surrogate_batch} {config.episodes}it"
    if config.init is not None:
        columns["init_from"] = Path(config.init).name
        label += f" init:{Path(config.init).name}"
    label += " train+val" if config.train_on_val else ""
    label += " strided-conv4" if config.conv4_downsample == "stride" and config.backbone.endswith("conv4") else ""
    label += f" aug:{columns['augmentation']}" if config.augment else ""
    label += " amp-bf16" if config.amp else ""
    label += " nsl-pytorch-ops" if not config.nsl_kernels else ""
    label += f" weights:{config.weights}" if config.weights != "real" else ""
    if config.method == "maml":
        order = "first" if config.first_order else "second"
        switches = list(maml_plus_plus(config).enabled()) + (["ca"] if config.lr_schedule == "cosine" else [])
        columns |= {
            "maml_head": config.head, "maml_head_init": config.head_init if config.head == "learned" else None,
            "inner_steps": config.inner_steps, "eval_inner_steps": config.eval_inner_steps,
            "inner_lr": config.inner_lr, "inner_loss": config.inner_loss, "maml_order": order,
            "maml_plus_plus": "+".join(switches) or "none",
        }  # fmt: skip
        head = f"{config.head}-head" + (f"({config.head_init})" if config.head == "learned" else "")
        label += f" {head} {config.inner_steps}/{config.eval_inner_steps} steps a={config.inner_lr}"
        label += f" {config.inner_loss}-loss {order}-order"
        label += "".join(f" {flag}" for flag, on in (("meta-sgd", config.meta_sgd), ("anil", config.anil)) if on)
        label += f" maml++:{'+'.join(switches)}" if switches else ""
    # The hash settles what the readable part leaves out (learning rate, schedule, NSL width ...):
    # two different recipes never share a label.
    return columns | {"recipe": f"{label} [{columns['config_hash']}]"}


def augmentation_label(config: RunConfig) -> str:
    """``none``, or the augmentation's settings, e.g. ``rrc0.08-flip-jitter0.4``."""
    if not config.augment:
        return "none"
    return Augmentation(config.augment_crop_scale, config.augment_jitter, config.augment_flip).label


NOT_RECIPE = ("seed", "run_dir", "data_root", "device", "val_every", "val_episodes", "checkpoint_every")
# Fields added after config hashes were first recorded: left out while at the values that reproduce
# what was trained before them, so such a recipe keeps the hash it had (augmentation settings count
# only with augment on).
LATER_FIELDS = {
    "split_ratios": (None,), "split_seed": (0,), "val_queries": (None,), "augment": (False,), "amp": (False,),
    "conv4_downsample": (None, "maxpool"), "head_init": (None, "uniform"),
    "surrogate_classes": (8000,), "samples_per_class": (100,), "surrogate_batch": (128,), "exemplar_transforms": (None,),
    "init": (None,), "weights": ("real",), "nsl_kernels": (True,),
}  # fmt: skip
AUGMENT_SETTINGS = ("augment_crop_scale", "augment_jitter", "augment_flip")


def recipe_hash(config: RunConfig) -> str:
    """A short fingerprint of everything in a resolved config that changes what is trained."""
    omitted = set(NOT_RECIPE) | {key for key, earlier in LATER_FIELDS.items() if getattr(config, key) in earlier}
    omitted |= set(AUGMENT_SETTINGS) if not config.augment else set()
    fields = {key: value for key, value in sorted(config.to_dict().items()) if key not in omitted}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:12]


def build_learner(
    config: RunConfig, image_shape: tuple[int, int, int], dropblock: torch.Generator | None = None
) -> FewShotLearner:
    """Backbone + learner from a resolved config; the only place both meet.

    ``dropblock``: the generator ResNet-12's DropBlock masks are drawn from in training (the trainer
    passes its own, seeded per rank and saved in checkpoints). A learner built only to be evaluated,
    where DropBlock draws nothing, gets one seeded from ``config.seed``.
    """
    similarity = resolve_similarity(config.backbone, config.similarity, config.nsl_form, config.nsl_hidden)
    backbone = build_backbone(
        config.backbone,
        image_shape,
        similarity=similarity,
        width=64 if config.width is None else config.width,
        plain_stem=config.plain_stem,
        drop_rate=config.drop_rate,
        generator=dropblock if dropblock is not None else torch.Generator().manual_seed(config.seed),
        conv4_downsample=config.conv4_downsample or "maxpool",
        weights=config.weights,
    )
    if not config.nsl_kernels:
        use_pytorch_path(backbone)
    if config.method == "protonet":
        return ProtoNet(backbone, distance=config.distance)
    if config.method == "exemplar":
        return ExemplarCNN(backbone, config.surrogate_classes)
    return MAML(
        backbone,
        inner_lr=config.inner_lr,
        inner_steps=config.inner_steps,
        eval_inner_steps=config.eval_inner_steps,
        first_order=config.first_order,
        meta_sgd=config.meta_sgd,
        anil=config.anil,
        head=config.head,
        head_init=config.head_init or "uniform",
        ways=config.ways,
        vectorise=bool(config.vectorise),
        inner_loss=config.inner_loss,
        plus_plus=maml_plus_plus(config),
        generator=torch.Generator().manual_seed(config.seed),
    )


__all__ = ["ExemplarCNN", "MAML", "MAMLPlusPlus", "maml_plus_plus", "recipe_columns", "recipe_hash", "BatchResult", "FewShotLearner", "ProtoNet", "build_learner"]

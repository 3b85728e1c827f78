"""Exemplar-CNN (Dosovitskiy et al., NIPS 2014): a backbone trained to tell surrogate classes apart.

In training a linear classifier over the surrogate classes sits on the backbone's features and the
loss is cross-entropy on :class:`~fewshot_nsl.data.surrogate.SurrogateBatch` labels (which mean
"same seed window", never a real class). Few-shot evaluation drops that classifier and scores
episodes with ProtoNet's prototype head on the same features (or, chosen at evaluation, the
logistic-regression head of :mod:`fewshot_nsl.learners.logreg`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch import nn
import torch.nn.functional as F

from fewshot_nsl.learners.base import BatchResult
from fewshot_nsl.learners.protonet import ProtoNet


class LabelledBatch(Protocol):
    images: torch.Tensor
    labels: torch.Tensor


class ExemplarCNN(ProtoNet):
    def __init__(self, backbone: nn.Module, surrogate_classes: int):
        super().__init__(backbone)
        features = getattr(backbone, "out_features", None)
        if not isinstance(features, int):
            raise ValueError(f"Exemplar-CNN needs a backbone with an int out_features, got {features!r}")
        self.classifier = nn.Linear(features, surrogate_classes)

    def batch_loss(self, batches: Sequence[LabelledBatch]) -> BatchResult:  # type: ignore[override]
        """Mean cross-entropy over surrogate classes, and the fraction classified right."""
        images = torch.cat([b.images for b in batches])
        labels = torch.cat([b.labels for b in batches])
        logits = self.classifier(self.backbone(images))
        correct = int((logits.argmax(1) == labels).sum())
        return BatchResult(F.cross_entropy(logits, labels), correct / labels.numel(), labels.numel())

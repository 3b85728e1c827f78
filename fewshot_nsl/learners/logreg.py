"""A logistic-regression head over a trained backbone, as in Tian et al. (2020), "Rethinking
few-shot image classification: a good embedding is all you need" (RFS).

Each episode fits scikit-learn's ``LogisticRegression`` on the support set's embeddings and
scores the queries with it; nothing of the backbone changes. RFS's evaluation recipe
(``eval/meta_eval.py`` of its code): embeddings L2-normalised, ``LogisticRegression`` with an L2
penalty, C = 1, lbfgs, at most 1000 iterations, ``random_state=0`` (multinomial for several
classes, scikit-learn's default with lbfgs).
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression

from fewshot_nsl.errors import UserError
from fewshot_nsl.learners.base import EmbeddingLearner, FewShotLearner
from fewshot_nsl.learners.protonet import ProtoNet

EVAL_HEADS = ("prototype", "logreg")


class LogisticRegressionHead(EmbeddingLearner):
    """``fit`` trains a logistic regression on the support embeddings; ``forward`` returns its
    log-probabilities for the queries (Q, ways)."""

    def __init__(self, backbone: nn.Module):
        super().__init__(backbone)
        self._classifier: LogisticRegression | None = None

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.backbone(images).flatten(1), dim=1)

    def fit(self, support_images: torch.Tensor, support_labels: torch.Tensor, ways: int) -> "LogisticRegressionHead":
        self._classifier = _fitted(self.embed(support_images), support_labels, ways)
        return self

    def forward(self, query_images: torch.Tensor) -> torch.Tensor:
        if self._classifier is None:
            raise RuntimeError("call fit(support) before scoring queries")
        return _log_probabilities(self._classifier, self.embed(query_images))

    def score_embedded(
        self, support: torch.Tensor, support_labels: torch.Tensor, ways: int, queries: torch.Tensor
    ) -> torch.Tensor:
        return _log_probabilities(_fitted(support, support_labels, ways), queries)


def with_head(learner: FewShotLearner, head: str | None) -> FewShotLearner:
    """``learner`` scored by ``head`` over its backbone's features: ``None`` keeps the learner's own
    scoring (ProtoNet's prototypes, MAML's adaptation), ``prototype`` is ProtoNet's head, ``logreg``
    :class:`LogisticRegressionHead`. The backbone is shared, not copied."""
    if head is None:
        return learner
    if head not in EVAL_HEADS:
        raise UserError(f"--head must be one of {', '.join(EVAL_HEADS)}, got {head!r}")
    if getattr(learner, "step_norms", None) is not None:
        raise UserError(
            "--head needs a backbone with its own BatchNorm parameters; this MAML++ run learned per-step ones "
            "(BNWB), which only its own head uses: evaluate it without --head"
        )
    if head == "prototype":
        return learner if isinstance(learner, ProtoNet) else ProtoNet(learner.backbone)
    return LogisticRegressionHead(learner.backbone)


def _fitted(support: torch.Tensor, labels: torch.Tensor, ways: int) -> LogisticRegression:
    found = torch.unique(labels).tolist()
    if found != list(range(ways)):
        raise ValueError(f"the support set must hold every label 0..{ways - 1}, got {found}")
    classifier = LogisticRegression(C=1.0, solver="lbfgs", max_iter=1000, random_state=0)
    return classifier.fit(support.detach().cpu().double().numpy(), labels.cpu().numpy())


def _log_probabilities(classifier: LogisticRegression, queries: torch.Tensor) -> torch.Tensor:
    scores = classifier.predict_log_proba(queries.detach().cpu().double().numpy())
    return torch.from_numpy(scores).to(device=queries.device, dtype=queries.dtype)

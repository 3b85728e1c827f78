"""MAML (Finn et al. 2017) written with ``torch.func``.

Adaptation is a pure function of a parameter dictionary: the inner loop
calls ``torch.func.grad`` on ``functional_call(backbone, params, x)`` and
builds new tensors ``w - lr * g``. Nothing is cloned and no module is
written during adaptation, so any ``nn.Module`` backbone works unchanged
(NSL layers included), and the same function can be ``vmap``-ed over a
meta-batch of tasks so that every layer runs once for all tasks instead of
once per task.

``torch.func.grad`` nested inside ordinary autograd keeps the inner
gradient differentiable with respect to the outer parameters, which is
exactly second-order MAML (``create_graph=True`` in the autograd-only
formulation).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, replace_all_batch_norm_modules_, vmap
from torch.overrides import TorchFunctionMode

from fewshot_nsl.episodes.episode import Episode
from fewshot_nsl.errors import UserError
from fewshot_nsl.learners.base import BatchResult, FewShotLearner

Params = dict[str, torch.Tensor]

HEADS = ("zero", "learned")
BACKBONE = "backbone."
HEAD_WEIGHT = "head.weight"
HEAD_BIAS = "head.bias"


class MAML(FewShotLearner):
    """Model-agnostic meta-learning over a backbone and a linear head.

    Args:
        backbone: maps (B, C, H, W) to (B, D) and has ``out_features == D``.
            The learner takes ownership: its BatchNorm layers are converted
            in place to always use batch statistics (see below).
        inner_lr: step size of the inner SGD loop (the initial value of the
            learned rates when ``meta_sgd``).
        inner_steps: inner steps while training (``self.training``).
        eval_inner_steps: inner steps in eval mode; more steps at test time
            than at training time is the usual MAML protocol.
        first_order: FOMAML; the inner gradients are treated as constants, so
            the meta-gradient is the query-loss gradient at the adapted
            parameters. Cheaper in time and memory than second order.
        meta_sgd: Meta-SGD (Li et al. 2017); one learnable rate per adapted
            parameter entry, initialised to ``inner_lr`` (the zero head: one
            per feature, shared by its rows).
        anil: ANIL (Raghu et al. 2020); only the head is adapted, the backbone
            is meta-learned but fixed within a task.
        head: ``"zero"`` (default) or ``"learned"``; see below.
        ways: number of classes of the learned head; ignored by the zero
            head, which takes each episode's ways.
        vectorise: run ``batch_loss`` with ``vmap`` over tasks when the
            episodes share shapes; otherwise task by task. Same result
            either way; which is faster depends on the device. ``vmap``
            saves a kernel launch per task and layer (what bounds small
            tasks on a GPU), but once the weights are adapted they differ
            per task and every convolution becomes a grouped one, which
            oneDNN runs slower than separate ones: on a 2-core CPU
            (Omniglot Conv-4, meta-batch 32) it took about twice the CPU
            time of the sequential loop (``benchmarks/maml_speed.py``), so
            pass ``False`` for CPU training.
        generator: draws the initial learned head; ``None`` means a
            generator seeded 0, so construction stays deterministic and never
            touches the global random state. Unused by the zero head.

    Heads. ``"zero"`` starts every episode from a zero weight and bias of
    the episode's own ``ways`` and adapts them in the inner loop; the
    meta-learned part is the backbone. It is the default because (a)
    training and evaluation ways may differ (e.g. train 20-way, test
    5-way), and (b) episode labels are an arbitrary permutation of the
    classes, so a meta-learned head row has no class to specialise to: the
    best start is permutation-symmetric, and zero is the symmetric start
    that the first inner step turns into a prototype-like classifier
    (Ye & Chao 2022, "How to train your MAML to excel in few-shot
    classification"). ``"learned"`` is the original MAML: a meta-learned
    ``(ways, D)`` linear layer, so every episode must have that many ways.

    BatchNorm is transductive, as in the original MAML: every forward pass
    normalises with the statistics of the batch it is given (the support
    set while adapting, the query set when scoring), in training and in
    eval mode alike. No running statistics exist, so nothing leaks from one
    task to the next. (It is computed from primitive ops, not the fused
    kernel, because of a ``vmap`` bug: see ``_BatchNormFromPrimitives``.)

    In eval mode adaptation starts from detached parameters: it needs no
    meta-graph, and it works under ``torch.no_grad()`` because
    ``torch.func.grad`` ignores an enclosing ``no_grad``.
    """

    adapts_backbone = True

    def __init__(
        self,
        backbone: nn.Module,
        inner_lr: float = 0.4,
        inner_steps: int = 1,
        eval_inner_steps: int = 3,
        first_order: bool = False,
        meta_sgd: bool = False,
        anil: bool = False,
        head: str = "zero",
        ways: int | None = None,
        vectorise: bool = True,
        generator: torch.Generator | None = None,
    ):
        _check_settings(backbone, inner_lr, inner_steps, eval_inner_steps, head, ways)
        super().__init__(backbone)
        replace_all_batch_norm_modules_(self.backbone)
        self.inner_lr = inner_lr
        self.inner_steps = inner_steps
        self.eval_inner_steps = eval_inner_steps
        self.first_order = first_order
        self.meta_sgd = meta_sgd
        self.anil = anil
        self.head_kind = head
        self.ways = ways
        self.vectorise = vectorise
        like = next(backbone.parameters(), torch.empty(0))
        self.head = (
            _uniform_linear(backbone.out_features, ways, generator or torch.Generator().manual_seed(0), like)
            if head == "learned"
            else None
        )
        body = () if anil else tuple(BACKBONE + n for n, _ in backbone.named_parameters())
        self.adapted_names: tuple[str, ...] = (*body, HEAD_WEIGHT, HEAD_BIAS)
        self.inner_lrs = (
            nn.ParameterDict(
                {
                    _rate_key(name): nn.Parameter(torch.full(shape, inner_lr, dtype=like.dtype, device=like.device))
                    for name, shape in self._rate_shapes().items()
                }
            )
            if meta_sgd
            else None
        )
        self._adapted: Params | None = None

    # ----- the two-phase interface -------------------------------------------------

    def fit(self, support_images: torch.Tensor, support_labels: torch.Tensor, ways: int) -> "MAML":
        """Adapt to the support set; in training mode the result stays differentiable."""
        params, rates = self._start(ways, support_images)
        self._adapted = self._adapt(params, rates, support_images, support_labels, self._steps())
        return self

    def forward(self, query_images: torch.Tensor) -> torch.Tensor:
        if self._adapted is None:
            raise RuntimeError("MAML.forward needs the support set first: call fit(...)")
        return self._logits(self._adapted, query_images)

    def batch_loss(self, episodes: Sequence[Episode]) -> BatchResult:
        """Mean query cross-entropy and accuracy over a meta-batch.

        Tasks of equal shapes go through one ``vmap``; otherwise (or with
        ``vectorise=False``) they run one after another. Both compute the
        same function.
        """
        if not episodes:
            raise ValueError("batch_loss needs at least one episode")
        if self.vectorise and _stackable(episodes):
            losses, correct = self._vectorised(episodes)
        else:
            losses, correct = self._sequential(episodes)
        total = sum(e.query_labels.numel() for e in episodes)
        return BatchResult(loss=losses.mean(), accuracy=int(correct.sum()) / total)

    # ----- meta-batch strategies ----------------------------------------------------

    def _vectorised(self, episodes: Sequence[Episode]) -> tuple[torch.Tensor, torch.Tensor]:
        params, rates = self._start(episodes[0].ways, episodes[0].support_images)
        steps = self._steps()

        def task(
            support_images: torch.Tensor,
            support_labels: torch.Tensor,
            query_images: torch.Tensor,
            query_labels: torch.Tensor,
        ) -> tuple[torch.Tensor, torch.Tensor]:
            return self._task_outcome(params, rates, support_images, support_labels, query_images, query_labels, steps)

        stacked = (
            torch.stack([e.support_images for e in episodes]),
            torch.stack([e.support_labels for e in episodes]),
            torch.stack([e.query_images for e in episodes]),
            torch.stack([e.query_labels for e in episodes]),
        )
        # "different": a random layer (e.g. dropout) draws per task, as it would sequentially.
        return vmap(task, randomness="different")(*stacked)

    def _sequential(self, episodes: Sequence[Episode]) -> tuple[torch.Tensor, torch.Tensor]:
        steps = self._steps()
        losses, correct = [], []
        for e in episodes:
            params, rates = self._start(e.ways, e.support_images)
            loss, hits = self._task_outcome(
                params, rates, e.support_images, e.support_labels, e.query_images, e.query_labels, steps
            )
            losses.append(loss)
            correct.append(hits)
        return torch.stack(losses), torch.stack(correct)

    # ----- pure functions of the parameters (vmap-able) -----------------------------

    def _task_outcome(
        self,
        params: Params,
        rates: Params,
        support_images: torch.Tensor,
        support_labels: torch.Tensor,
        query_images: torch.Tensor,
        query_labels: torch.Tensor,
        steps: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Query loss and number of correct queries of one task after adaptation."""
        logits = self._logits(self._adapt(params, rates, support_images, support_labels, steps), query_images)
        return F.cross_entropy(logits, query_labels), (logits.argmax(-1) == query_labels).sum()

    def _adapt(
        self, params: Params, rates: Params, support_images: torch.Tensor, support_labels: torch.Tensor, steps: int
    ) -> Params:
        """``steps`` SGD steps on the support loss, over ``adapted_names`` only."""
        fast = {name: params[name] for name in self.adapted_names}
        fixed = {name: p for name, p in params.items() if name not in fast}
        for _ in range(steps):
            grads = self._support_gradient(fast, fixed, support_images, support_labels)
            fast = {name: w - rates[name] * grads[name] for name, w in fast.items()}
        return {**fixed, **fast}

    def _support_gradient(self, fast: Params, fixed: Params, images: torch.Tensor, labels: torch.Tensor) -> Params:
        """Gradient of the support loss w.r.t. ``fast``.

        Second order: the gradient is itself differentiable w.r.t. the outer
        parameters. First order: it is computed from detached copies, so it
        is a constant for the outer autograd and costs no meta-graph.
        """
        if self.first_order:
            fast, fixed = _detached(fast), _detached(fixed)
        return grad(self._support_loss)(fast, fixed, images, labels)

    def _support_loss(self, fast: Params, fixed: Params, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self._logits({**fixed, **fast}, images), labels)

    def _logits(self, params: Params, images: torch.Tensor) -> torch.Tensor:
        body = {name.removeprefix(BACKBONE): p for name, p in params.items() if name.startswith(BACKBONE)}
        with _BatchNormFromPrimitives():
            features = functional_call(self.backbone, body, (images,))
        return F.linear(features, params[HEAD_WEIGHT], params[HEAD_BIAS])

    # ----- where adaptation starts --------------------------------------------------

    def _start(self, ways: int, like: torch.Tensor) -> tuple[Params, Params]:
        """Meta-parameters (backbone + head for ``ways``) and inner rates of one task.

        Detached in eval mode: evaluation never needs the meta-graph.
        """
        params = {BACKBONE + n: p for n, p in self.backbone.named_parameters()}
        params.update(self._initial_head(ways, like))
        if self.inner_lrs is not None:
            rates = {name: self.inner_lrs[_rate_key(name)] for name in self.adapted_names}
        else:
            rates = dict.fromkeys(self.adapted_names, torch.tensor(self.inner_lr, dtype=like.dtype, device=like.device))
        if not self.training:
            params, rates = _detached(params), _detached(rates)
        return params, rates

    def _initial_head(self, ways: int, like: torch.Tensor) -> Params:
        if self.head_kind == "learned":
            if ways != self.ways:
                raise UserError(
                    f"MAML head='learned' was built for {self.ways}-way episodes but got a {ways}-way episode; "
                    "use head='zero' to train and evaluate with different ways"
                )
            return {HEAD_WEIGHT: self.head.weight, HEAD_BIAS: self.head.bias}
        if ways < 1:
            raise ValueError(f"an episode needs at least one way, got {ways}")
        features: int = self.backbone.out_features
        return {HEAD_WEIGHT: like.new_zeros(ways, features), HEAD_BIAS: like.new_zeros(ways)}

    def _steps(self) -> int:
        return self.inner_steps if self.training else self.eval_inner_steps

    def _rate_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shape of the Meta-SGD rate of every adapted parameter.

        The zero head gets one rate per feature shared by all rows: it has
        no fixed number of rows, and no row is special.
        """
        features: int = self.backbone.out_features
        shapes = {BACKBONE + n: tuple(p.shape) for n, p in self.backbone.named_parameters()}
        if self.head is not None:
            shapes.update({HEAD_WEIGHT: tuple(self.head.weight.shape), HEAD_BIAS: tuple(self.head.bias.shape)})
        else:
            shapes.update({HEAD_WEIGHT: (1, features), HEAD_BIAS: (1,)})
        return {name: shapes[name] for name in self.adapted_names}


def _check_settings(
    backbone: nn.Module,
    inner_lr: float,
    inner_steps: int,
    eval_inner_steps: int,
    head: str,
    ways: int | None,
) -> None:
    """Reject settings that would otherwise fail late, deep inside a training run."""
    features = getattr(backbone, "out_features", None)
    if not isinstance(features, int) or features < 1:
        raise UserError(f"MAML needs a backbone with an int out_features >= 1, got {features!r}")
    if not (math.isfinite(inner_lr) and inner_lr > 0):
        raise UserError(f"inner_lr must be a positive number, got {inner_lr}")
    for name, steps in (("inner_steps", inner_steps), ("eval_inner_steps", eval_inner_steps)):
        if not isinstance(steps, int) or steps < 1:
            raise UserError(f"MAML {name} must be an int >= 1, got {steps!r}")
    if head not in HEADS:
        raise UserError(f"unknown MAML head {head!r}; choose one of {', '.join(HEADS)}")
    if head == "learned" and (not isinstance(ways, int) or ways < 2):
        raise UserError(f"head='learned' needs the number of ways (an int >= 2), got {ways!r}")


def _uniform_linear(features: int, ways: int, generator: torch.Generator, like: torch.Tensor) -> nn.Linear:
    """``nn.Linear(features, ways)`` with PyTorch's default bound 1/sqrt(fan_in), drawn from ``generator``.

    Built on the meta device first so that the global random state is never touched.
    """
    layer = nn.Linear(features, ways, device="meta", dtype=like.dtype).to_empty(device=like.device)
    bound = 1 / math.sqrt(features)
    with torch.no_grad():
        for p in (layer.weight, layer.bias):
            p.copy_(torch.empty(p.shape, dtype=p.dtype).uniform_(-bound, bound, generator=generator))
    return layer


class _BatchNormFromPrimitives(TorchFunctionMode):
    """Computes batch-statistics BatchNorm from mean/var/rsqrt instead of the fused kernel.

    Why: under ``vmap`` the batching rule of the fused kernel's backward
    gives a wrong input gradient when it is itself differentiated
    (pytorch/functorch#534, still present in torch 2.14), which is exactly
    what vectorised second-order MAML does: meta-gradients of the layers
    below a BatchNorm came out a few percent off. Written from primitives,
    the same function gets correct batching rules. Only batch-statistics
    calls (no running statistics, which this learner never has) are
    rewritten; any other call goes to ``F.batch_norm`` unchanged.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.batch_norm:
            return _batch_norm(*args, **kwargs)
        return func(*args, **kwargs)


def _batch_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
) -> torch.Tensor:
    """``F.batch_norm`` (same signature); batch-statistics calls are built from primitives."""
    if running_mean is not None or running_var is not None or not training:
        return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    dims = [0, *range(2, input.dim())]
    mean = input.mean(dims, keepdim=True)
    variance = input.var(dims, correction=0, keepdim=True)
    out = (input - mean) * torch.rsqrt(variance + eps)
    channels = [1, -1] + [1] * (input.dim() - 2)
    if weight is not None:
        out = out * weight.view(channels)
    if bias is not None:
        out = out + bias.view(channels)
    return out


def _rate_key(name: str) -> str:
    """ParameterDict keys may not contain dots."""
    return name.replace(".", "/")


def _detached(params: Params) -> Params:
    return {name: p.detach() for name, p in params.items()}


def _stackable(episodes: Sequence[Episode]) -> bool:
    """Whether the episodes can be stacked into one batch of tasks for ``vmap``."""
    first = episodes[0]

    def shapes(e: Episode) -> tuple:
        return (e.ways, e.support_images.shape, e.support_labels.shape, e.query_images.shape, e.query_labels.shape)

    return all(shapes(e) == shapes(first) for e in episodes)

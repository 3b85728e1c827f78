"""MAML (Finn et al. 2017) written with ``torch.func``, with the MAML++ switches.

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
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, replace_all_batch_norm_modules_, vmap
from torch.overrides import TorchFunctionMode

from fewshot_nsl.episodes.episode import Episode
from fewshot_nsl.errors import UserError
from fewshot_nsl.learners.base import BatchResult, FewShotLearner

Params = dict[str, torch.Tensor]

# "learned": Finn et al.'s meta-learned linear head. "zero": the zeroing trick
# of Kao et al. (ICLR 2022, "MAML is a noisy contrastive learner in few-shot
# classification", Sec. 4): the head's weights start every task at zero.
HEADS = ("learned", "zero")
# "mean": the mean support cross-entropy; Finn et al.'s paper computes each inner gradient
# "using a batch size of NK examples" (Appendix A.1), as the PyTorch ports do.
# "tf-sum": what their TensorFlow code differentiates, the per-example cross-entropy
# divided by the shots and summed (cbfinn/maml utils.py xent, maml.py tf.gradients),
# i.e. ways x the mean: the same inner_lr is a ways-times larger step.
INNER_LOSSES = ("mean", "tf-sum")
HEAD_INITS = ("uniform", "normal", "xavier")
BACKBONE = "backbone."
HEAD_WEIGHT = "head.weight"
HEAD_BIAS = "head.bias"


@dataclass(frozen=True)
class MAMLPlusPlus:
    """The optional MAML++ switches (Antoniou et al., ICLR 2019, "How to train your MAML").

    All off (the default) is plain MAML. The fifth switch, cosine annealing
    of the meta learning rate, belongs to the meta-optimiser and lives in
    the engine (``lr_schedule: cosine``).

    Attributes:
        per_step_bn: BNWB; every BatchNorm layer gets one weight and bias per
            inner step (index ``s`` is used by every forward pass at the
            parameters after ``s`` steps; the query pass after the last
            step uses the last index). They are meta-learned and, as in
            MAML++, not adapted by the inner loop. Steps beyond the training
            steps (more steps at evaluation) reuse the last index.
        lslr: LSLR; one learned inner learning rate per adapted parameter
            tensor and inner step, initialised to ``inner_lr``; extra
            evaluation steps reuse the last step's rate.
        multi_step_loss: MSL; the task loss is a weighted sum of the query
            losses after every inner step, with weights annealed from uniform
            to the final step alone over ``msl_anneal_iterations``.
        msl_anneal_iterations: meta-iterations over which MSL anneals.
        first_order_until: DA; first-order meta-gradients up to and including
            this meta-iteration, second order afterwards (0: from the start).
    """

    per_step_bn: bool = False
    lslr: bool = False
    multi_step_loss: bool = False
    msl_anneal_iterations: int = 5000
    first_order_until: int = 0

    def enabled(self) -> tuple[str, ...]:
        """Short names of the switches that are on (what a leaderboard row records)."""
        named = (
            ("bnwb", self.per_step_bn),
            ("lslr", self.lslr),
            ("msl", self.multi_step_loss),
            (f"da{self.first_order_until}", self.first_order_until > 0),
        )
        return tuple(name for name, on in named if on)


def multi_step_loss_weights(steps: int, iteration: int, anneal_iterations: int) -> list[float]:
    """MAML++'s per-step loss importance at a meta-iteration.

    Starts uniform (1/S each); every non-final weight decays linearly by
    1/S over ``anneal_iterations`` (floor 0.03/S), and the final weight takes
    up what they lose (cap 1 - (S-1)·0.03/S); from ``anneal_iterations`` on,
    only the final step counts. As Antoniou et al.'s
    ``get_per_step_loss_importance_vector`` and its use in
    ``few_shot_learning_system.py``, except that progress moves every
    meta-iteration instead of every 500-iteration epoch.
    """
    if iteration >= anneal_iterations:
        return [0.0] * (steps - 1) + [1.0]
    uniform = 1.0 / steps
    decayed = uniform * min(iteration / anneal_iterations, 1.0)
    floor = 0.03 / steps
    weights = [max(uniform - decayed, floor)] * (steps - 1)
    weights.append(min(uniform + (steps - 1) * decayed, 1.0 - (steps - 1) * floor))
    return weights


class MAML(FewShotLearner):
    """Model-agnostic meta-learning over a backbone and a linear head.

    Args:
        backbone: maps (B, C, H, W) to (B, D) and has ``out_features == D``.
            The learner takes ownership: its BatchNorm layers are converted
            in place to always use batch statistics (see below).
        inner_lr: step size of the inner SGD loop (the initial value of the
            learned rates with ``meta_sgd`` or MAML++'s LSLR).
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
        head: ``"learned"`` (default) or ``"zero"``; see below.
        ways: number of classes of the learned head; ignored by the zero
            head, which takes each episode's ways.
        vectorise: run meta-batches with ``vmap`` over tasks when the
            episodes share shapes; otherwise task by task. Same result
            either way; which is faster depends on device and task size
            (``benchmarks/results/maml_speed.md`` has the measurements).
        inner_loss: the support loss the inner loop descends: ``"mean"``
            (default; the paper's "batch size of NK examples", MAML++ and
            the PyTorch ports) or ``"tf-sum"``, the scaling of Finn et al.'s
            TensorFlow code (summed cross-entropy / shots = ways x the
            mean), with which the same ``inner_lr`` is a ``ways`` times
            larger step.
        plus_plus: the MAML++ switches (all off by default).
        generator: draws the initial learned head; ``None`` means a
            generator seeded 0, so construction stays deterministic and never
            touches the global random state. Unused by the zero head.

    Heads. ``"learned"`` is Finn et al.'s: a meta-learned ``(ways, D)``
    linear layer, adapted with the backbone, so every episode must have
    that many ways; ``head_init`` draws its initial weight: ``"uniform"``
    (PyTorch's ``nn.Linear`` default, bound 1/sqrt(D)), ``"normal"`` (N(0, 1),
    Finn et al.'s Omniglot code) or ``"xavier"`` (Glorot's uniform, their
    Mini-ImageNet code); the bias starts at zero except with ``"uniform"``.
    ``"zero"`` is Kao et al.'s zeroing trick (ICLR 2022):
    every task starts from a zero weight and bias of the episode's own
    ``ways`` (so training and test ways may differ). Caveat: with a zero
    head the first inner step gives the backbone a zero gradient (the loss
    reaches it only through the head weights), so with one inner step the
    backbone is never adapted in training: the learner is then ANIL with a
    prototype-like head. Use two or more inner steps with it.

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
        head: str = "learned",
        ways: int | None = None,
        vectorise: bool = True,
        inner_loss: str = "mean",
        plus_plus: MAMLPlusPlus = MAMLPlusPlus(),
        generator: torch.Generator | None = None,
        head_init: str = "uniform",
    ):
        _check_settings(backbone, inner_lr, inner_steps, eval_inner_steps, head, ways, meta_sgd, plus_plus)
        if inner_loss not in INNER_LOSSES:
            raise UserError(f"unknown MAML inner loss {inner_loss!r}; choose one of {', '.join(INNER_LOSSES)}")
        if head_init not in HEAD_INITS:
            raise UserError(f"unknown MAML head_init {head_init!r}; choose one of {', '.join(HEAD_INITS)}")
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
        self.inner_loss = inner_loss
        self.plus_plus = plus_plus
        self.iteration = 0  # meta-iterations done; drives MAML++'s annealing
        like = next(backbone.parameters(), torch.empty(0))
        self.head = (
            _initial_linear(backbone.out_features, ways, head_init, generator or torch.Generator().manual_seed(0), like)
            if head == "learned"
            else None
        )
        self.step_norms = self._per_step_norms() if plus_plus.per_step_bn else None
        per_step = set(self._step_norm_tables())
        # Frozen parameters (``--weights random-frozen``) are not adapted either.
        trained = [n for n, p in backbone.named_parameters() if n not in per_step and p.requires_grad]
        body = () if anil else tuple(BACKBONE + n for n in trained)
        self.adapted_names: tuple[str, ...] = (*body, HEAD_WEIGHT, HEAD_BIAS)
        self.inner_lrs = self._learned_rates(like) if (meta_sgd or plus_plus.lslr) else None
        self._adapted: Params | None = None
        self._adapted_for: tuple | None = None

    # ----- the two-phase interface -------------------------------------------------

    def fit(self, support_images: torch.Tensor, support_labels: torch.Tensor, ways: int) -> "MAML":
        """Adapt to the support set; in training mode the result stays differentiable."""
        params, rates = self._start(ways, support_images)
        self._adapted = self._adapt(params, rates, support_images, support_labels, self._steps())
        self._adapted_for = self._meta_state()
        return self

    def forward(self, query_images: torch.Tensor) -> torch.Tensor:
        """Query logits with the parameters adapted by the last ``fit``.

        Refused when there was no ``fit`` since the meta-parameters last
        changed (an optimiser step, a loaded state), since the train/eval
        mode changed, or since a meta-batch ran: scoring would silently use
        another task's adaptation.
        """
        if self._adapted is None or self._adapted_for != self._meta_state():
            raise RuntimeError(
                "MAML.forward needs this task's support set first: call fit(support_images, support_labels, ways) "
                "(the last adaptation is gone or stale: the meta-parameters, the mode or the task changed since)"
            )
        return self._logits(self._adapted, query_images, self._steps())

    def batch_loss(self, episodes: Sequence[Episode]) -> BatchResult:
        """Mean query loss (MAML++'s multi-step loss when on) and accuracy over a meta-batch.

        Two or more tasks of equal shapes go through one ``vmap``; otherwise (or with
        ``vectorise=False``) they run one after another. Both compute the
        same function. The whole meta-batch's graph is kept until the loss
        is differentiated; ``backward_batch`` keeps one task's at a time.
        """
        self._forget()
        if self._vectorises(episodes):
            losses, correct = self._vectorised(episodes)
        else:
            outcomes = [self._episode_outcome(e) for e in episodes]
            losses, correct = torch.stack([o[0] for o in outcomes]), torch.stack([o[1] for o in outcomes])
        scored = _query_count(episodes)
        return BatchResult(loss=losses.mean(), accuracy=int(correct.sum()) / scored, scored=scored)

    def backward_parts(self, episodes: Sequence[Episode]) -> list[Sequence[Episode]]:
        """One part when the meta-batch is vectorised (one batched graph); otherwise task by task,
        each backpropagated as soon as its query loss is known, so peak memory is one task's
        graph whatever the meta-batch size. The gradients sum to the same meta-gradient."""
        if self._vectorises(episodes):
            return [episodes]
        return [[episode] for episode in episodes]

    def set_iteration(self, iteration: int) -> None:
        """Tell the learner how many meta-iterations are done (MAML++'s MSL and DA anneal with it)."""
        self.iteration = iteration

    # ----- meta-batch strategies ----------------------------------------------------

    def _vectorises(self, episodes: Sequence[Episode]) -> bool:
        """vmap over a meta-batch of two or more tasks of equal shapes (over one task it would only add overhead)."""
        if not episodes:
            raise ValueError("a meta-batch needs at least one episode")
        return self.vectorise and len(episodes) > 1 and _stackable(episodes)

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

    def _episode_outcome(self, e: Episode) -> tuple[torch.Tensor, torch.Tensor]:
        params, rates = self._start(e.ways, e.support_images)
        return self._task_outcome(
            params, rates, e.support_images, e.support_labels, e.query_images, e.query_labels, self._steps()
        )

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
        """Loss and number of correct queries of one task after adaptation.

        The loss is the query loss after the last step, or with MAML++'s
        multi-step loss (training only) the weighted sum over all steps.
        """
        weights = self._step_loss_weights(steps)
        fast, fixed = self._split(params)
        loss = torch.zeros((), dtype=query_images.dtype, device=query_images.device)
        for step in range(steps):
            fast = self._inner_step(fast, fixed, rates, support_images, support_labels, step)
            if step < steps - 1 and weights[step] > 0:
                loss = loss + weights[step] * F.cross_entropy(
                    self._logits({**fixed, **fast}, query_images, step + 1), query_labels
                )
        logits = self._logits({**fixed, **fast}, query_images, steps)
        loss = loss + weights[-1] * F.cross_entropy(logits, query_labels)
        return loss, (logits.argmax(-1) == query_labels).sum()

    def _adapt(
        self, params: Params, rates: Params, support_images: torch.Tensor, support_labels: torch.Tensor, steps: int
    ) -> Params:
        """``steps`` SGD steps on the support loss, over ``adapted_names`` only."""
        fast, fixed = self._split(params)
        for step in range(steps):
            fast = self._inner_step(fast, fixed, rates, support_images, support_labels, step)
        return {**fixed, **fast}

    def _inner_step(
        self, fast: Params, fixed: Params, rates: Params, images: torch.Tensor, labels: torch.Tensor, step: int
    ) -> Params:
        """One SGD step on the support loss at the parameters after ``step`` steps.

        Second order: the gradient is itself differentiable w.r.t. the outer
        parameters. First order: it is computed from detached copies, so it
        is a constant for the outer autograd and costs no meta-graph.
        """
        if self._first_order_now():
            grads = grad(self._support_loss)(_detached(fast), _detached(fixed), images, labels, step)
        else:
            grads = grad(self._support_loss)(fast, fixed, images, labels, step)
        return {name: w - self._rate(rates[name], step) * grads[name] for name, w in fast.items()}

    def _support_loss(
        self, fast: Params, fixed: Params, images: torch.Tensor, labels: torch.Tensor, step: int
    ) -> torch.Tensor:
        logits = self._logits({**fixed, **fast}, images, step)
        scale = logits.shape[-1] if self.inner_loss == "tf-sum" else 1
        return scale * F.cross_entropy(logits, labels)

    def _logits(self, params: Params, images: torch.Tensor, step: int) -> torch.Tensor:
        """Head logits at ``params``; ``step`` (inner steps taken) selects MAML++'s per-step BatchNorm."""
        body = {name.removeprefix(BACKBONE): p for name, p in params.items() if name.startswith(BACKBONE)}
        for name, table in self._step_norm_tables().items():
            body[name] = table[min(step, table.shape[0] - 1)]
        with _BatchNormFromPrimitives():
            features = functional_call(self.backbone, body, (images,))
        return F.linear(features, params[HEAD_WEIGHT], params[HEAD_BIAS])

    def _split(self, params: Params) -> tuple[Params, Params]:
        """(adapted, fixed) parameters."""
        fast = {name: params[name] for name in self.adapted_names}
        return fast, {name: p for name, p in params.items() if name not in fast}

    def _rate(self, rate: torch.Tensor, step: int) -> torch.Tensor:
        """The inner learning rate of one parameter at ``step`` (LSLR rates have a step axis)."""
        if self.plus_plus.lslr:
            return rate[min(step, rate.shape[0] - 1)]
        return rate

    # ----- where adaptation starts, and the annealed schedules ----------------------

    def _start(self, ways: int, like: torch.Tensor) -> tuple[Params, Params]:
        """Meta-parameters (backbone + head for ``ways``) and inner rates of one task.

        Detached in eval mode: evaluation never needs the meta-graph.
        """
        per_step = set(self._step_norm_tables())
        params = {BACKBONE + n: p for n, p in self.backbone.named_parameters() if n not in per_step}
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

    def _first_order_now(self) -> bool:
        return self.first_order or (self.training and self.iteration < self.plus_plus.first_order_until)

    def _step_loss_weights(self, steps: int) -> list[float]:
        if self.plus_plus.multi_step_loss and self.training and steps > 1:
            return multi_step_loss_weights(steps, self.iteration, self.plus_plus.msl_anneal_iterations)
        return [0.0] * (steps - 1) + [1.0]

    def _meta_state(self) -> tuple:
        """What an adaptation depends on besides the task: mode and every meta-parameter's version."""
        return (self.training, *(p._version for p in self.parameters()))

    def _step_norm_tables(self) -> dict[str, torch.Tensor]:
        """MAML++'s per-step BatchNorm tables by the backbone parameter they stand for (none when off)."""
        if self.step_norms is None:
            return {}
        return {_name_of_key(key): table for key, table in self.step_norms.items()}

    def _forget(self) -> None:
        self._adapted = self._adapted_for = None

    # ----- construction helpers -----------------------------------------------------

    def _per_step_norms(self) -> nn.ParameterDict:
        """MAML++ BNWB: (inner_steps + 1, C) weight and bias tables, one row per step.

        They replace the BatchNorm layers' own affine parameters, which are
        frozen (kept only so that the backbone's state stays loadable).
        """
        tables = {}
        for name, module in self.backbone.named_modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
                for kind in ("weight", "bias"):
                    own = getattr(module, kind)
                    own.requires_grad_(False)
                    rows = own.detach().unsqueeze(0).repeat(self.inner_steps + 1, 1)
                    tables[f"{name}.{kind}" if name else kind] = nn.Parameter(rows)
        return nn.ParameterDict({_rate_key(name): table for name, table in tables.items()})

    def _learned_rates(self, like: torch.Tensor) -> nn.ParameterDict:
        """Meta-SGD: a rate per parameter entry; LSLR: a rate per parameter tensor and inner step."""
        return nn.ParameterDict(
            {
                _rate_key(name): nn.Parameter(torch.full(shape, self.inner_lr, dtype=like.dtype, device=like.device))
                for name, shape in self._rate_shapes().items()
            }
        )

    def _rate_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shape of the learned rate of every adapted parameter.

        LSLR: (inner_steps,). Meta-SGD: the parameter's shape; the zero
        head gets one rate per feature shared by all rows: it has no fixed
        number of rows, and no row is special.
        """
        if self.plus_plus.lslr:
            return {name: (self.inner_steps,) for name in self.adapted_names}
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
    meta_sgd: bool,
    plus_plus: MAMLPlusPlus,
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
    if meta_sgd and plus_plus.lslr:
        raise UserError("choose one learned inner rate: Meta-SGD (per entry) or MAML++ LSLR (per layer and step)")
    if plus_plus.msl_anneal_iterations < 1 or plus_plus.first_order_until < 0:
        raise UserError("MAML++: msl_anneal_iterations must be >= 1 and first_order_until >= 0")


def _initial_linear(features: int, ways: int, init: str, generator: torch.Generator, like: torch.Tensor) -> nn.Linear:
    """``nn.Linear(features, ways)`` initialised as ``init`` says (see ``MAML``), drawn from ``generator``.

    Built on the meta device first so that the global random state is never touched.
    """
    layer = nn.Linear(features, ways, device="meta", dtype=like.dtype).to_empty(device=like.device)
    with torch.no_grad():
        weight = torch.empty(layer.weight.shape, dtype=like.dtype)
        bias = torch.zeros(layer.bias.shape, dtype=like.dtype)
        if init == "uniform":  # PyTorch's default for nn.Linear, weight and bias
            bound = 1 / math.sqrt(features)
            weight.uniform_(-bound, bound, generator=generator)
            bias.uniform_(-bound, bound, generator=generator)
        elif init == "normal":
            weight.normal_(0.0, 1.0, generator=generator)
        else:  # xavier: Glorot & Bengio's uniform bound sqrt(6 / (fan_in + fan_out))
            bound = math.sqrt(6 / (features + ways))
            weight.uniform_(-bound, bound, generator=generator)
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
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
    variance, mean = torch.var_mean(input, dims, correction=0, keepdim=True)  # one pass over the activations
    # Fold the normalisation and the affine map into one per-channel scale and shift (small tensors),
    # so the activation-sized work is a single multiply-add.
    channels = [1, -1] + [1] * (input.dim() - 2)
    scale = torch.rsqrt(variance + eps)
    if weight is not None:
        scale = scale * weight.view(channels)
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.view(channels)
    return torch.addcmul(shift, input, scale)


def _rate_key(name: str) -> str:
    """ParameterDict keys may not contain dots."""
    return name.replace(".", "/")


def _name_of_key(key: str) -> str:
    return key.replace("/", ".")


def _query_count(episodes: Sequence[Episode]) -> int:
    return sum(e.query_labels.numel() for e in episodes)


def _detached(params: Params) -> Params:
    return {name: p.detach() for name, p in params.items()}


def _stackable(episodes: Sequence[Episode]) -> bool:
    """Whether the episodes can be stacked into one batch of tasks for ``vmap``."""
    first = episodes[0]

    def shapes(e: Episode) -> tuple:
        return (e.ways, e.support_images.shape, e.support_labels.shape, e.query_images.shape, e.query_labels.shape)

    return all(shapes(e) == shapes(first) for e in episodes)

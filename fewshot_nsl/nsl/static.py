"""Static NSL: a learned, input-independent tap-mixing matrix ``M9``.

Because ``M9`` does not depend on the input it folds into the kernel,
``W'[o,c,j] = sum_i w[o,c,i] M9[i,j]``, so training costs one tiny matmul on
the weights plus an ordinary convolution, and evaluation can drop the layer
altogether for a plain ``nn.Conv2d`` (:func:`fold_static_nsl`).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn
import torch.nn.functional as F

from fewshot_nsl.nsl.patches import NSLConvBase


class StaticNSLConv2d(NSLConvBase):
    """Convolution scored as ``w^T (M9 kron I_C) x(p)`` with a learned ``M9``.

    ``M`` holds ``M9``: shape (k*k,) for ``form="diagonal"`` (``M9 = diag(M)``,
    a per-tap gain) or (k*k, k*k) for ``form="full"`` (taps may borrow from
    each other). It starts at the identity, so a fresh layer computes exactly
    the convolution with ``weight``. ``penalty`` weights
    :meth:`regularization_loss`, which keeps the full form near the identity
    (the weight and ``M9`` are otherwise only identifiable up to a product).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int = 1,
        bias: bool = False,
        form: str = "diagonal",
        penalty: float = 5e-3,
    ):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, bias, form)
        if isinstance(penalty, bool) or not isinstance(penalty, (int, float)) or not math.isfinite(penalty) or penalty < 0:
            raise ValueError(f"penalty must be a finite number >= 0, got {penalty!r}")
        self.penalty = float(penalty)
        identity = torch.ones(self.taps) if form == "diagonal" else torch.eye(self.taps)
        self.M = nn.Parameter(identity)

    def folded_weight(self) -> torch.Tensor:
        """The effective kernel ``W' = w M9`` (O, C, k, k), differentiable in both."""
        if self.form == "diagonal":
            return self.weight * self.M.view(1, 1, self.kernel_size, self.kernel_size)
        return (self.weight.flatten(2) @ self.M).view_as(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.folded_weight(), self.bias, self.stride, self.padding)

    def regularization_loss(self) -> torch.Tensor:
        """``penalty * ||M9 - I||_F^2`` for the full form; a zero tensor for the
        diagonal form (a per-tap gain needs no anchoring). Trainers add this
        up over every module that has it."""
        if self.form == "diagonal":
            return self.M.new_zeros(())
        eye = torch.eye(self.taps, dtype=self.M.dtype, device=self.M.device)
        return self.penalty * (self.M - eye).square().sum()

    def fold(self) -> nn.Conv2d:
        """An ``nn.Conv2d`` (same geometry, bias, device, dtype, train/eval
        mode) with weight ``W'``: identical outputs, no NSL overhead."""
        conv = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            self.stride,
            self.padding,
            bias=self.bias is not None,
            device=self.weight.device,
            dtype=self.weight.dtype,
        )
        with torch.no_grad():
            conv.weight.copy_(self.folded_weight())
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv.train(self.training)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, penalty={self.penalty}"


def fold_static_nsl(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` with every :class:`StaticNSLConv2d` replaced by
    its folded ``nn.Conv2d`` (``module`` itself is left untouched).

    Used for evaluation, where the static similarity then costs nothing.
    """
    if isinstance(module, StaticNSLConv2d):
        return module.fold()
    folded = copy.deepcopy(module)
    _fold_children(folded)
    return folded


def _fold_children(parent: nn.Module) -> None:
    for name, child in parent.named_children():
        if isinstance(child, StaticNSLConv2d):
            setattr(parent, name, child.fold())
        else:
            _fold_children(child)

"""What the static and dynamic NSL layers share: argument checks, the
convolution parameters, and tap-patch extraction / its adjoint.

Notation used across the package: a ``k x k`` kernel has ``k**2`` *taps*
(row-major, tap ``t = i * k + j``); ``M9`` is the ``k**2 x k**2`` matrix that
mixes them. Both layers compute
``y[b,o,p] = sum_c sum_{i,j} w[o,c,i] * M9[i,j] * x[b,c,p + delta_j]``.
"""

from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F

FORMS = ("diagonal", "full")


def require_int(name: str, value: object, minimum: int) -> int:
    """Return ``value`` if it is an int >= ``minimum``, else raise ``ValueError``.

    ``bool`` is rejected although it subclasses int: ``kernel_size=True`` is a
    bug, not a 1.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def validate_conv_args(
    in_channels: int, out_channels: int, kernel_size: int, stride: int, padding: int, form: str
) -> None:
    """Raise ``ValueError`` naming the first bad constructor argument.

    Only square kernels with an odd size are accepted: the similarity matrix is
    indexed by taps around a centre, and ``padding = k // 2`` keeps the grid.
    """
    require_int("in_channels", in_channels, 1)
    require_int("out_channels", out_channels, 1)
    require_int("kernel_size", kernel_size, 1)
    if kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd, got {kernel_size}")
    require_int("stride", stride, 1)
    require_int("padding", padding, 0)
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")


class NSLConvBase(nn.Module):
    """Convolution parameters (``weight``, optional ``bias``) and geometry.

    Initialised exactly like ``nn.Conv2d`` (kaiming-uniform with a=sqrt(5)),
    so that an NSL layer whose similarity is the identity *is* the default
    convolution, and swapping a backbone's convs for NSL ones changes nothing
    at initialisation.
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, stride: int, padding: int, bias: bool, form: str
    ):
        super().__init__()
        validate_conv_args(in_channels, out_channels, kernel_size, stride, padding, form)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = padding
        self.form = form
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(in_channels * kernel_size * kernel_size)
            nn.init.uniform_(self.bias, -bound, bound)

    @property
    def taps(self) -> int:
        """Number of kernel taps, ``k**2`` (the side of ``M9``)."""
        return self.kernel_size * self.kernel_size

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, bias={self.bias is not None}, form={self.form!r}"
        )


def is_channels_last(x: torch.Tensor) -> bool:
    """Whether a 4-d tensor is laid out NHWC.

    Decided from strides because ``is_contiguous(memory_format=...)`` is not
    available inside ``torch.func.vmap``.
    """
    return x.stride(1) == 1 and x.stride(3) == x.shape[1]


def to_channels_last(x: torch.Tensor) -> torch.Tensor:
    """``x`` with NHWC memory (a no-op when it already is), via permutes so
    that it also works inside ``vmap``."""
    return x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)


def padded_nhwc(x: torch.Tensor, padding: int) -> torch.Tensor:
    """Zero-pad an NCHW-shaped tensor and return it as a contiguous NHWC one.

    Free of copies beyond the pad itself for channels_last inputs; for NCHW
    inputs the transpose happens here, once, so patch gathers read runs of
    contiguous channels.
    """
    return F.pad(x, (padding,) * 4).permute(0, 2, 3, 1).contiguous()


def tap_patches(x_nhwc: torch.Tensor, kernel_size: int, stride: int) -> torch.Tensor:
    """View ``(n, Ho, Wo, k, k, C)`` of every patch of a padded NHWC tensor.

    ``[b, h, w, i, j, c] = x_nhwc[b, h*stride + i, w*stride + j, c]``. No copy:
    consumers read it once while producing what they need (modulated patches).
    """
    return x_nhwc.unfold(1, kernel_size, stride).unfold(2, kernel_size, stride).permute(0, 1, 2, 4, 5, 3)


def fold_tap_patches(
    grad: torch.Tensor, padded_height: int, padded_width: int, stride: int, gain: torch.Tensor | None = None
) -> torch.Tensor:
    """Adjoint of :func:`tap_patches`: scatter-add ``(n, Ho, Wo, k, k, C)`` back
    onto the padded NHWC grid ``(n, Hp, Wp, C)`` (col2im).

    ``gain`` (n, Ho, Wo, k, k, 1), if given, multiplies ``grad`` on the fly,
    sparing a pass over the patch-sized tensor. One in-place add per tap into
    a fresh buffer (a tap's windows do not overlap); the read-only operands
    are split with ``unbind`` to keep the per-tap indexing cheap. ``new_zeros``
    keeps the buffer batched under ``vmap`` and the adds stay differentiable
    (double backward). The gain is applied out of place (``+= g * gain``, not
    ``addcmul_``): vmap has no batching rule for ``addcmul_`` and would fall
    back to a per-task loop.
    """
    n, _, _, k, _, channels = grad.shape
    out = grad.new_zeros((n, padded_height, padded_width, channels))
    windows = tap_patches(out, k, stride)
    grads = grad.flatten(3, 4).unbind(3)
    gains = gain.flatten(3, 4).unbind(3) if gain is not None else None
    for t, g in enumerate(grads):
        window = windows.select(3, t // k).select(3, t % k)
        if gains is None:
            window += g
        else:
            window += g * gains[t]
    return out

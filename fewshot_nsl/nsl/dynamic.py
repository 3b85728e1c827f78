"""Dynamic NSL: a convolution whose tap-mixing matrix depends on the input.

``M9(b, p) = I + G(x)(b, p)`` is predicted per sample and output position by
a small meta-network over the layer's own input, so the layer can reweight
(diagonal form) or re-route (full form) its kernel taps locally.

Speed. The published implementation materialises the per-tap responses (a
convolution with ``k**2`` times the output channels). Here the modulation is
applied to the *input* patches instead: for a block of positions the patches
``X`` (``L x k**2 x C``) are gathered, mixed along the tap axis
(``m * X`` or ``M(p) @ X``, cost ``C * k**2`` or ``C * k**4`` per position),
and multiplied by the kernel, the convolution's own FLOPs. Three
implementations compute this:

* ``fused`` (the default): compiled CPU kernels (:mod:`fewshot_nsl.nsl.fused`)
  that build each block of modulated patches in cache and multiply it at once
  with a register-blocked micro-kernel, and form the backward's patch-space
  gradient once for both the input and the similarity gradients;
* ``patches`` (PyTorch): a custom autograd function that gathers the patches
  chunk by chunk and runs the product and both of its gradients as oneDNN 1x1
  convolutions, recomputing the patches in backward instead of saving them;
  it also serves the calls the kernels do not (double backward, vmap);
* ``planes`` (PyTorch, diagonal form): patches unfolded channel-major, for
  layers with few input channels, where the patch path's loops are too thin.

Their costs against a plain convolution: benchmarks/nsl_layer_overhead.py.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
import torch.nn.functional as F

from fewshot_nsl.nsl import fused
from fewshot_nsl.nsl.patches import (
    NSLConvBase,
    require_int,
    fold_tap_patches,
    is_channels_last,
    padded_nhwc,
    tap_patches,
    to_channels_last,
)

# Patch-matrix elements (positions x k**2 x C) processed at once on CPU: the
# chunk's patches, modulated patches and their gradients (4 MiB each in
# float32) then stay in L2/L3 between the gather, the GEMMs and the scatter.
CPU_CHUNK_ELEMENTS = 1 << 20
PATHS = ("planes", "patches", "fused")


def _samples_per_chunk(x: torch.Tensor, patch_elements_per_sample: int, chunk_elements: int) -> int:
    """Chunk over the batch on CPU (cache residency); accelerators take the
    whole batch in one go, since per-chunk kernel launches would dominate."""
    if x.device.type != "cpu":
        return x.shape[0]
    return max(1, chunk_elements // patch_elements_per_sample)


def _modulate(patches: torch.Tensor, sim: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix the tap axis of ``patches`` (n, Ho, Wo, k, k, C) with ``sim``.

    ``sim`` is (n, Ho, Wo, k*k) (diagonal) or (n, Ho, Wo, k*k, k*k) (full, row
    i holds ``M9[i, :]``). Returns the modulated patches, contiguous
    (n*Ho*Wo, k*k*C) tap-major, and the operand backward reuses: the gain
    (n, Ho, Wo, k, k, 1) (diagonal) or the gathered patches (n, Ho, Wo, k*k, C)
    (full, where the gather is a copy the batched matmul needs anyway).
    """
    n, out_h, out_w, k, _, channels = patches.shape
    if sim.dim() == 4:
        gain = sim.contiguous().view(n, out_h, out_w, k, k, 1)
        # gain first: TensorIterator then lays the product out contiguously,
        # fusing the gather and the modulation into one pass.
        return (gain * patches).view(-1, k * k * channels), gain
    gathered = patches.reshape(n, out_h, out_w, k * k, channels)
    return torch.matmul(sim, gathered).view(-1, k * k * channels), gathered


def _tap_major(weight: torch.Tensor) -> torch.Tensor:
    """The kernel (O, C, k, k) as a 1x1 convolution over tap-major patches,
    (O, k*k*C, 1, 1), matching the channel order of :func:`_modulate`'s rows."""
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1, 1, 1)


def _as_planes(rows: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
    """Position-major rows (n*Ho*Wo, D) as a channels_last (n, D, Ho, Wo)
    tensor, without a copy, so oneDNN can treat them as a 1x1 convolution's input."""
    return rows.view(-1, out_h, out_w, rows.shape[-1]).permute(0, 3, 1, 2)


class _ChannelSquares(torch.autograd.Function):
    """``sum_c x[b,c,h,w]**2`` as (B, 1, H, W), for a channels_last ``x``.

    Why a Function: the forward takes ``vector_norm`` squared, a single
    reduction pass (``vecdot(x, x)`` materialises ``x * x`` first), whose own
    autograd would have NaN second derivatives at all-zero pixels (MAML); the
    backward is the polynomial's, ``2 x g``, as a single product in ``x``'s
    NHWC memory, where autograd's backward of ``vecdot`` broadcast the
    gradient in another layout and added two products. Ordinary ops in
    backward: double backward and ``generate_vmap_rule`` work.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm(x, dim=1, keepdim=True).square()

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        x_nhwc = x.permute(0, 2, 3, 1)
        return (x_nhwc * (2 * grad).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _normalised_conv_ops(
    x: torch.Tensor, weight: torch.Tensor, energy_kernel: torch.Tensor, eps: float, stride: int, padding: int
) -> torch.Tensor:
    """The meta-network's first stage in PyTorch ops: ``conv(x, weight)`` divided
    by the patch norm, the energy being a 1-channel box sum of ``sum_c x**2``
    (see _ChannelSquares)."""
    energy = F.conv2d(_ChannelSquares.apply(x), energy_kernel, None, stride, padding)
    return F.conv2d(x, weight, None, stride, padding) * torch.rsqrt(energy + eps)


class _NormalisedConv(torch.autograd.Function):
    """:func:`_normalised_conv_ops` for training on the fused path: the forward
    and a backward that builds no graph run the kernels
    (:func:`fewshot_nsl.nsl.fused.normalised_conv`), where autograd would take
    a squares pass, a box-sum convolution, an rsqrt and a product, each with
    its backward, and add three input gradients. A backward that builds a
    graph (MAML's second order) differentiates the PyTorch ops instead, on the
    saved inputs, so the result stays differentiable. ``torch.func`` calls
    never get here (``fused.meta_serves`` refuses their tensors).
    """

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, energy_kernel: torch.Tensor, eps: float, stride: int, padding: int
    ) -> torch.Tensor:
        hidden, norms = fused.normalised_conv(x, weight, eps, stride, padding)
        ctx.save_for_backward(x, weight, energy_kernel, hidden, norms)
        ctx.eps, ctx.stride, ctx.padding = eps, stride, padding
        return hidden

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        x, weight, energy_kernel, hidden, norms = ctx.saved_tensors
        needs = ctx.needs_input_grad[:2]
        if torch.is_grad_enabled():
            with torch.enable_grad():
                recomputed = _normalised_conv_ops(x, weight, energy_kernel, ctx.eps, ctx.stride, ctx.padding)
            wanted = [tensor for tensor, need in zip((x, weight), needs) if need]
            grads = iter(torch.autograd.grad(recomputed, wanted, grad, create_graph=True))
            grad_x, grad_w = (next(grads) if need else None for need in needs)
        else:
            grad_x, grad_w = fused.normalised_conv_backward(
                x, weight, hidden, norms, grad, ctx.stride, ctx.padding, needs
            )
        return grad_x, grad_w, None, None, None, None


def _fused_output(
    x: torch.Tensor, weight: torch.Tensor, sim: torch.Tensor, stride: int, padding: int, nhwc_out: bool
) -> torch.Tensor:
    """The compiled forward as (B, O, Ho, Wo), NHWC in memory when ``nhwc_out``."""
    y = fused.forward(x, weight, sim, stride, padding).permute(0, 3, 1, 2)
    return y if nhwc_out else y.contiguous()


class _TapModulatedConv(torch.autograd.Function):
    """``y[b,o,p] = sum_{c,i,j} w[o,c,i] sim(b,p)[i,j] x[b,c,p+delta_j]``.

    Inputs: ``x`` (B, C, H, W), ``weight`` (O, C, k, k), ``sim`` tap-last
    (B, Ho, Wo, k*k[, k*k]). Output (B, O, Ho, Wo), channels_last when
    ``nhwc_out`` (each chunk's GEMM writes straight into that layout).
    ``chunk_elements`` bounds the patch elements handled at once on CPU.
    ``use_fused`` hands the calls that need no graph to the compiled kernels
    (:mod:`fewshot_nsl.nsl.fused`) where they apply; everything else is written
    with ordinary differentiable ops only (double backward for MAML) and
    ``generate_vmap_rule`` (vmap over tasks, per-task weights).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(
        x: torch.Tensor,
        weight: torch.Tensor,
        sim: torch.Tensor,
        stride: int,
        padding: int,
        nhwc_out: bool,
        chunk_elements: int = CPU_CHUNK_ELEMENTS,
        use_fused: bool = False,
    ) -> torch.Tensor:
        if use_fused and fused.applies(x, weight, sim):
            return _fused_output(x, weight, sim, stride, padding, nhwc_out)
        batch = x.shape[0]
        out_channels, _, k, _ = weight.shape
        out_h, out_w = sim.shape[1], sim.shape[2]
        taps_weight = _tap_major(weight)
        chunk = _samples_per_chunk(x, out_h * out_w * taps_weight.shape[1], chunk_elements)
        parts = []
        for start in range(0, batch, chunk):
            patches = tap_patches(padded_nhwc(x[start : start + chunk], padding), k, stride)
            modulated, _ = _modulate(patches, sim[start : start + chunk])
            parts.append(F.conv2d(_as_planes(modulated, out_h, out_w), taps_weight))
        y = torch.cat(parts)  # channels_last, like each part
        return y if nhwc_out else y.contiguous()

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        x, weight, sim, stride, padding, _, *options = inputs
        ctx.save_for_backward(x, weight, sim)
        ctx.stride, ctx.padding = stride, padding
        ctx.chunk_elements = options[0] if options else CPU_CHUNK_ELEMENTS
        ctx.use_fused = options[1] if len(options) > 1 else False

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple:
        x, weight, sim = ctx.saved_tensors
        need_x, need_w, need_sim = ctx.needs_input_grad[:3]
        stride, padding = ctx.stride, ctx.padding
        batch, channels, height, width = x.shape
        out_channels, _, k, _ = weight.shape
        out_h, out_w = sim.shape[1], sim.shape[2]
        # A backward that builds a graph (double backward) must stay differentiable.
        if ctx.use_fused and not torch.is_grad_enabled() and fused.applies(x, weight, sim):
            grads = fused.backward(x, weight, sim, grad_out, stride, padding, (need_x, need_w, need_sim))
            return *grads, None, None, None, None, None
        taps_weight = _tap_major(weight)
        # The input-side gradient of the 1x1 convolution is the 1x1 convolution
        # with the transposed matrix (O -> k*k*C channels).
        transposed_weight = taps_weight.flatten(1).t().reshape(-1, out_channels, 1, 1)
        chunk = _samples_per_chunk(x, out_h * out_w * taps_weight.shape[1], ctx.chunk_elements)
        diagonal = sim.dim() == 4
        grad_w = None
        grad_x_parts, grad_sim_parts = [], []
        for start in range(0, batch, chunk):
            stop = min(start + chunk, batch)
            n = stop - start
            x_pad = padded_nhwc(x[start:stop], padding)
            patches = tap_patches(x_pad, k, stride)
            sim_c = sim[start:stop]
            modulated, operand = _modulate(patches, sim_c)
            g = to_channels_last(grad_out[start:stop])
            if need_w:
                # Taken as the weight gradient of the transposed 1x1 convolution
                # (O -> k*k*C), the form oneDNN ran faster than the direct one in a
                # development timing at 42x42 (not a committed measurement).
                part = torch.nn.grad.conv2d_weight(g, transposed_weight.shape, _as_planes(modulated, out_h, out_w))
                grad_w = part if grad_w is None else grad_w + part
            if not (need_x or need_sim):
                continue
            # d loss / d modulated patches, (n, Ho, Wo, k*k*C) tap-major.
            grad_mod = F.conv2d(g, transposed_weight).permute(0, 2, 3, 1)
            if diagonal:
                grad_mod = grad_mod.reshape(n, out_h, out_w, k, k, channels)
                if need_sim:
                    grad_sim_parts.append(torch.linalg.vecdot(grad_mod, patches).view(n, out_h, out_w, k * k))
                if need_x:
                    grad_pad = fold_tap_patches(grad_mod, x_pad.shape[1], x_pad.shape[2], stride, gain=operand)
            else:
                grad_mod = grad_mod.reshape(n, out_h, out_w, k * k, channels)
                if need_sim:
                    grad_sim_parts.append(torch.matmul(grad_mod, operand.transpose(-1, -2)))
                if need_x:
                    grad_patches = torch.matmul(sim_c.transpose(-1, -2), grad_mod)
                    grad_pad = fold_tap_patches(
                        grad_patches.view(n, out_h, out_w, k, k, channels), x_pad.shape[1], x_pad.shape[2], stride
                    )
            if need_x:
                grad_x_parts.append(grad_pad[:, padding : padding + height, padding : padding + width].permute(0, 3, 1, 2))
        grad_x = torch.cat(grad_x_parts) if need_x else None
        grad_sim = torch.cat(grad_sim_parts) if need_sim else None
        if grad_w is not None:
            grad_w = grad_w.flatten(1).t().reshape(out_channels, k, k, channels).permute(0, 3, 1, 2)
        return grad_x, grad_w, grad_sim, None, None, None, None, None


def _planes_modulated_conv(
    x: torch.Tensor, weight: torch.Tensor, gain: torch.Tensor, stride: int, padding: int
) -> torch.Tensor:
    """Diagonal tap-modulated convolution for layers with few input channels (a stem).

    With ``C <= PLANES_MAX_CHANNELS`` the chunked path's elementwise loops run
    over only ``C`` contiguous values and its GEMMs have ``k*k*C <= 36`` columns,
    both slow. Here the patches are unfolded channel-major, ``(C, k*k, L)``, so
    the modulation runs along whole rows of positions; the modulated patches
    (at most 36 values per position, cheap to keep) then meet the kernel in a
    1x1 convolution that oneDNN runs far better than a thin GEMM. Plain
    differentiable ops: autograd supplies backward, double backward and vmap.
    ``gain`` is (B, k*k, Ho, Wo); the output is channels_last (B, O, Ho, Wo).
    """
    batch, channels = x.shape[0], x.shape[1]
    out_channels, _, k, _ = weight.shape
    out_h, out_w = gain.shape[2], gain.shape[3]
    patches = F.unfold(x, k, padding=padding, stride=stride).view(batch, channels, k * k, out_h * out_w)
    modulated = (patches * gain.reshape(batch, 1, k * k, out_h * out_w)).view(batch, -1, out_h, out_w)
    return F.conv2d(to_channels_last(modulated), weight.reshape(out_channels, -1, 1, 1))


# Input channels up to which the diagonal form takes :func:`_planes_modulated_conv` by default
# when it computes in PyTorch (benchmarks/results/nsl_layer_overhead.md: 1.8-3.2x faster than
# the chunked path on 1- and 3-channel stems).
PLANES_MAX_CHANNELS = 4


class DynamicNSLConv2d(NSLConvBase):
    """Convolution with an input-dependent neural similarity ``M9(b,p) = I + G(x)(b,p)``.

    ``G``: ``conv k x k (C -> hidden, the layer's stride/padding)`` divided by
    the local patch norm ``sqrt(sum_{c,taps} x**2 + eps)`` (so it sees the
    patch's *shape*, not its contrast), then BatchNorm, ReLU and a 3x3 conv to
    ``k**2`` (diagonal) or ``k**4`` (full) channels. That last conv starts
    near zero, so a fresh layer is the plain convolution plus a tiny
    perturbation and NSL can be swapped into a pretrained-style init safely.

    The meta-network's BatchNorm is an ordinary ``nn.BatchNorm2d``, so
    ``torch.func.replace_all_batch_norm_modules_`` (vmap over tasks) finds it.

    ``path`` picks the implementation of the modulated convolution (all
    compute the same function): ``"planes"`` (diagonal form only),
    ``"patches"`` (PyTorch ops), or ``"fused"``: the compiled CPU kernels of
    :mod:`fewshot_nsl.nsl.fused` for the calls they serve, and for the rest
    (double backward, ``torch.func`` transforms, float64, GPUs, no compiler)
    :attr:`pytorch_path`. On the fused path a forward that records no graph
    (evaluation) also runs the meta-network's normalisation, BatchNorm and
    ReLU in one kernel pass, on image stems its first convolution too
    (:func:`fewshot_nsl.nsl.fused.meta_hidden`); in training the
    normalisation and its gradients run in the kernels (``_NormalisedConv``). By
    default fused, except full-form layers with at most
    ``PLANES_MAX_CHANNELS`` input channels (image stems), where the patch
    path was measured faster. ``chunk_elements`` bounds the patch path's
    working set on CPU (see ``CPU_CHUNK_ELEMENTS``).
    """

    energy_eps = 1e-6

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int = 1,
        bias: bool = False,
        form: str = "diagonal",
        hidden: int = 64,
        path: str | None = None,
        chunk_elements: int = CPU_CHUNK_ELEMENTS,
    ):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, bias, form)
        self.hidden = require_int("hidden", hidden, 1)
        if path not in (None, *PATHS) or (path == "planes" and form != "diagonal"):
            raise ValueError(f"path must be one of {PATHS} ('planes' for the diagonal form only), got {path!r}")
        self.path = path or self._default_path()
        self.chunk_elements = require_int("chunk_elements", chunk_elements, 1)
        taps = self.taps
        self.meta_conv = nn.Conv2d(in_channels, hidden, kernel_size, stride, padding, bias=False)
        self.meta_bn = nn.BatchNorm2d(hidden)
        self.meta_out = nn.Conv2d(hidden, taps if form == "diagonal" else taps * taps, 3, 1, 1)
        with torch.no_grad():
            self.meta_out.weight.mul_(1e-3)
            self.meta_out.bias.zero_()
        self.register_buffer("energy_kernel", torch.ones(1, 1, kernel_size, kernel_size), persistent=False)
        # I in M9 = I + G(x), as meta_out's output channels: added to that convolution's bias.
        identity = torch.ones(taps) if form == "diagonal" else torch.eye(taps).flatten()
        self.register_buffer("identity", identity, persistent=False)

    def similarity(self, x: torch.Tensor) -> torch.Tensor:
        """The per-position similarity the forward pass uses.

        Diagonal form: ``m = 1 + g`` of shape (B, k*k, Ho, Wo), the diagonal of
        ``M9``. Full form: ``I + g`` of shape (B, k*k, k*k, Ho, Wo), ``[:, i, j]``
        being ``M9[i, j]``.
        """
        x = to_channels_last(x)
        weight = self.meta_conv.weight
        fused_path = self.path == "fused"
        if fused_path and fused.meta_hidden_applies(x, weight):
            hidden = self._fused_hidden(x)
        else:
            kernels = fused_path and fused.meta_serves(x, weight)
            stage = _NormalisedConv.apply if kernels else _normalised_conv_ops
            h = stage(x, weight, self.energy_kernel, self.energy_eps, self.stride, self.padding)
            hidden = F.relu(self.meta_bn(h), inplace=True)
        # I + G(x): the identity joins the output convolution's bias, so it is
        # added inside that convolution instead of in a pass of its own.
        out = self.meta_out
        bias = self.identity if out.bias is None else out.bias + self.identity
        m = F.conv2d(hidden, out.weight, bias, out.stride, out.padding)
        return m if self.form == "diagonal" else m.unflatten(1, (self.taps, self.taps))

    def _fused_hidden(self, x: torch.Tensor) -> torch.Tensor:
        """The meta-network's hidden activations from the compiled kernel (no
        graph): with BatchNorm on running statistics the kernel applies it and
        the ReLU too; with batch statistics they run on its output."""
        bn = self.meta_bn
        if bn.training or bn.running_mean is None or bn.running_var is None:
            u = fused.meta_hidden(x, self.meta_conv.weight, self.energy_eps, self.stride, self.padding)
            return F.relu(bn(u), inplace=True)
        scale = torch.rsqrt(bn.running_var + bn.eps)
        scale = scale if bn.weight is None else scale * bn.weight
        shift = -bn.running_mean * scale if bn.bias is None else torch.addcmul(bn.bias, bn.running_mean, scale, value=-1)
        return fused.meta_hidden(x, self.meta_conv.weight, self.energy_eps, self.stride, self.padding, scale, shift)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nhwc_out = is_channels_last(x)
        # oneDNN convolutions and the patch gathers are fastest on NHWC data;
        # the output still comes back in the caller's layout.
        x = to_channels_last(x)
        sim = self.similarity(x)
        path = self.path
        if path == "fused" and not fused.applies(x, self.weight, sim):
            path = self.pytorch_path
        if path == "planes":
            y = _planes_modulated_conv(x, self.weight, sim, self.stride, self.padding)
            y = y if nhwc_out else y.contiguous()
            return y if self.bias is None else y + self.bias.view(1, -1, 1, 1)
        tap_last = sim.permute(0, 2, 3, 1) if self.form == "diagonal" else sim.permute(0, 3, 4, 1, 2)
        if path == "fused" and not torch.is_grad_enabled():
            # Nothing to record: the kernel directly, without the autograd Function's dispatch.
            y = _fused_output(x, self.weight, tap_last, self.stride, self.padding, nhwc_out)
        else:
            y = _TapModulatedConv.apply(
                x, self.weight, tap_last, self.stride, self.padding, nhwc_out, self.chunk_elements, path == "fused"
            )
        if self.bias is not None:
            y = y + self.bias.view(1, -1, 1, 1)
        return y

    def _default_path(self) -> str:
        if self.form == "full" and self.in_channels <= PLANES_MAX_CHANNELS:
            return self.pytorch_path
        return "fused"

    @property
    def pytorch_path(self) -> str:
        """The faster PyTorch implementation for this layer: planes for diagonal
        layers with at most ``PLANES_MAX_CHANNELS`` input channels, else patches."""
        return "planes" if self.form == "diagonal" and self.in_channels <= PLANES_MAX_CHANNELS else "patches"

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, hidden={self.hidden}, path={self.path}"


def use_pytorch_path(model: nn.Module) -> nn.Module:
    """Put every dynamic NSL layer in ``model`` on its :attr:`~DynamicNSLConv2d.pytorch_path`, in place.

    The same function as the default (fused) path, summed in PyTorch's order: the
    implementation the compiled kernels replaced and are tested against. Returns ``model``.
    """
    for module in model.modules():
        if isinstance(module, DynamicNSLConv2d):
            module.path = module.pytorch_path
    return model

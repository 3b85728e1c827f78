"""The fused CPU kernels of dynamic NSL, compiled on first use.

``kernels/tap_modulated_conv.cpp`` builds each block of modulated patches in
cache and multiplies it at once (see its header for why), and runs the
meta-network's first stage: in evaluation its normalisation, BatchNorm and
ReLU in one pass over memory, on image stems with its first convolution
(:func:`meta_hidden`); in training the normalisation and the patch energy's
gradient (:func:`normalised_conv` and its backward). It is compiled by
``torch.utils.cpp_extension`` the first time a dynamic NSL layer runs on CPU
(once; the build is cached under ``TORCH_EXTENSIONS_DIR``, by
default ``~/.cache/torch_extensions``). It needs a C++ compiler with OpenMP
(``ninja`` comes with the package's dependencies); where the build fails the layers run their PyTorch path and one
warning says why. ``FEWSHOT_NSL_FUSED=0`` turns the kernels off.

The kernels are not differentiable, so they serve only the calls where that
is not needed: a forward, and a backward that builds no graph (evaluation's
meta-network kernel: a forward that records no graph at all). Double
backward (MAML's second order) and ``torch.func`` transforms take the PyTorch
path, which computes the same function.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F

SOURCE = Path(__file__).with_name("kernels") / "tap_modulated_conv.cpp"
SWITCH_VARIABLE = "FEWSHOT_NSL_FUSED"
# The micro-kernel works on whole vectors of 16 floats along its output columns:
# the layer's output channels must fill them.
VECTOR_LANES = 16
# Outputs larger than this go to memory whatever the stores, and their reader
# takes them from there: the forward writes them with streaming stores, which
# skip reading each line in first (image stems; benchmarks/nsl_layer_overhead.py
# times them). 32 MiB: the last-level cache one core complex shares on current
# x86 server parts (this machine's EPYC; glibc reports the whole package's).
STREAMED_OUTPUT_BYTES = 32 << 20
# Input channels up to which meta_hidden runs the meta-network's first
# convolution in the kernel too: the grey and colour image stems, whose
# `meta-network` rows benchmarks/nsl_layer_overhead.py times.
DIRECT_META_MAX_CHANNELS = 3


@functools.cache
def extension() -> ModuleType | None:
    """The compiled kernels, or ``None`` where they are switched off or do not build."""
    if os.environ.get(SWITCH_VARIABLE, "1") == "0":
        return None
    from torch.utils.cpp_extension import load

    try:
        with _ninja_on_path():
            return load(
                name="fewshot_nsl_tap_modulated_conv",
                sources=[str(SOURCE)],
                extra_cflags=["-O3", "-march=native", "-fopenmp"],
                extra_ldflags=["-fopenmp"],
            )
    except (OSError, RuntimeError, ImportError, ValueError) as error:
        # The first line without the compiler command line torch appends after ": [".
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0].split(": [")[0]
        warnings.warn(
            f"fused dynamic NSL kernels did not build ({first_line}); dynamic NSL runs its slower PyTorch path. "
            f"Install a C++ compiler with OpenMP (e.g. g++), or set {SWITCH_VARIABLE}=0 to silence this.",
            stacklevel=3,
        )
        return None


@contextlib.contextmanager
def _ninja_on_path() -> Iterator[None]:
    """``torch.utils.cpp_extension`` runs ``ninja`` from PATH; a virtual
    environment that is not activated has the pip-installed one (a dependency)
    off PATH, so lend it for the build."""
    if shutil.which("ninja") is not None:
        yield
        return
    import ninja

    saved = os.environ.get("PATH", "")
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + saved
    try:
        yield
    finally:
        os.environ["PATH"] = saved


def _plain(tensor: torch.Tensor) -> bool:
    # torch.func wraps tensors (vmap batching, grad tracking); the kernels
    # read raw memory, so those calls take the PyTorch path.
    return not torch._C._functorch.is_functorch_wrapped_tensor(tensor)


def _served(*tensors: torch.Tensor) -> bool:
    return all(t.device.type == "cpu" and t.dtype == torch.float32 and _plain(t) for t in tensors)


def applies(x: torch.Tensor, weight: torch.Tensor, sim: torch.Tensor) -> bool:
    """Whether the kernels can compute this modulated convolution (and are available)."""
    return _served(x, weight, sim) and weight.shape[0] % VECTOR_LANES == 0 and extension() is not None


def meta_serves(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the meta-network kernels (:func:`meta_hidden`,
    :func:`normalised_conv` and its backward) can take these tensors."""
    return _served(x, weight) and extension() is not None


def meta_hidden_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether :func:`meta_hidden` can compute this call: no graph is being
    recorded (it has no backward) and the kernels serve the tensors."""
    return not torch.is_grad_enabled() and meta_serves(x, weight)


def _nhwc(tensor: torch.Tensor) -> torch.Tensor:
    """A (B, C, H, W) tensor's NHWC memory, copied only if it is not channels_last already."""
    return tensor.permute(0, 2, 3, 1).contiguous()


def tap_matrix(weight: torch.Tensor) -> torch.Tensor:
    """The kernel (O, C, k, k) as the (k*k*C, O) matrix the kernels multiply, rows tap-major."""
    out_channels = weight.shape[0]
    return weight.permute(2, 3, 1, 0).reshape(-1, out_channels).contiguous()


def forward(x: torch.Tensor, weight: torch.Tensor, sim: torch.Tensor, stride: int, padding: int) -> torch.Tensor:
    """``y`` (B, Ho, Wo, O) from ``x`` (B, C, H, W) and the tap-last similarity."""
    kernel = extension()
    assert kernel is not None, "call applies() first"
    out_h, out_w = sim.shape[1], sim.shape[2]
    output_bytes = x.shape[0] * out_h * out_w * weight.shape[0] * x.element_size()
    stream = output_bytes > STREAMED_OUTPUT_BYTES
    return kernel.forward(_nhwc(x), sim.contiguous(), tap_matrix(weight), weight.shape[-1], stride, padding, stream)


def meta_hidden(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    stride: int,
    padding: int,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
) -> torch.Tensor:
    """The meta-network's first stage: ``conv(x, weight)`` divided by the
    patch norm ``sqrt(sum_{c,taps} x**2 + eps)``, then, with ``scale`` and
    ``shift`` (BatchNorm on running statistics, per channel),
    ``relu(u * scale + shift)``. The convolution is oneDNN's and the rest one
    kernel pass, except on inputs of at most ``DIRECT_META_MAX_CHANNELS``
    channels (image stems), where the kernel computes the convolution as well,
    in the same pass as the energy and the normalisation. ``x`` is (B, C, H, W),
    ``weight`` (h, C, k, k); returns (B, h, Ho, Wo), channels_last."""
    affine = (scale.contiguous(), shift.contiguous()) if scale is not None and shift is not None else (None, None)
    return _first_stage(x, weight, eps, stride, padding, *affine, norms=None)


def normalised_conv(
    x: torch.Tensor, weight: torch.Tensor, eps: float, stride: int, padding: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training's forward of the meta-network's first stage: ``conv(x, weight)``
    divided by the patch norm (as :func:`meta_hidden`, without BatchNorm), and
    the inverse patch norms (B, Ho, Wo) that :func:`normalised_conv_backward` needs."""
    out_h, out_w = _output_size(x, weight, stride, padding)
    norms = x.new_empty(x.shape[0], out_h, out_w)
    return _first_stage(x, weight, eps, stride, padding, None, None, norms=norms), norms


def _output_size(x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int) -> tuple[int, int]:
    k = weight.shape[-1]
    return (x.shape[2] + 2 * padding - k) // stride + 1, (x.shape[3] + 2 * padding - k) // stride + 1


def _first_stage(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    stride: int,
    padding: int,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
    norms: torch.Tensor | None,
) -> torch.Tensor:
    """:func:`meta_hidden`'s work; the inverse patch norms go to ``norms`` where given."""
    kernel = extension()
    assert kernel is not None, "call meta_serves() first"
    hidden, channels, k, _ = weight.shape
    if channels <= DIRECT_META_MAX_CHANNELS:
        # Zero columns up to whole vectors; the kernel writes the first `hidden`.
        columns = F.pad(tap_matrix(weight), (0, -hidden % VECTOR_LANES)).contiguous()
        out_h, out_w = _output_size(x, weight, stride, padding)
        stream = x.shape[0] * out_h * out_w * hidden * x.element_size() > STREAMED_OUTPUT_BYTES
        u = kernel.meta_hidden_direct(_nhwc(x), columns, hidden, k, stride, padding, eps, scale, shift, norms, stream)
        return u.permute(0, 3, 1, 2)
    x = _nhwc(x).permute(0, 3, 1, 2)  # channels_last: oneDNN then writes u NHWC
    u = F.conv2d(x, weight, None, stride, padding).permute(0, 2, 3, 1).contiguous()
    kernel.meta_normalize(x.permute(0, 2, 3, 1), u, k, stride, padding, eps, scale, shift, norms)
    return u.permute(0, 3, 1, 2)


def normalised_conv_backward(
    x: torch.Tensor,
    weight: torch.Tensor,
    hidden: torch.Tensor,
    norms: torch.Tensor,
    grad_hidden: torch.Tensor,
    stride: int,
    padding: int,
    needs: tuple[bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of :func:`normalised_conv` for ``x`` (channels_last) and
    ``weight``, each ``None`` where ``needs`` says it is not wanted: one kernel
    pass gives the convolution's output gradient and the energy's; oneDNN's
    convolution backward takes the first, and the second joins the input
    gradient in place (no separate tensor for autograd to add)."""
    kernel = extension()
    assert kernel is not None, "call meta_serves() first"
    need_x, need_w = needs
    grad_u, grad_energy = kernel.meta_normalize_backward(_nhwc(grad_hidden), _nhwc(hidden), norms)
    x_nhwc = _nhwc(x)
    k = weight.shape[-1]
    grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
        grad_u.permute(0, 3, 1, 2), x_nhwc.permute(0, 3, 1, 2), weight, None,
        [stride, stride], [padding, padding], [1, 1], False, [0, 0], 1, [need_x, need_w, False],
    )  # fmt: skip
    if need_x:
        grad_x = _nhwc(grad_x)
        kernel.add_energy_gradient(x_nhwc, grad_x, grad_energy, k, stride, padding)
        grad_x = grad_x.permute(0, 3, 1, 2)
    return (grad_x if need_x else None), (grad_w if need_w else None)


def backward(
    x: torch.Tensor,
    weight: torch.Tensor,
    sim: torch.Tensor,
    grad_y: torch.Tensor,
    stride: int,
    padding: int,
    needs: tuple[bool, bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients for ``x`` (channels_last), the weight (O, C, k, k) and the
    similarity, each ``None`` where ``needs`` says it is not wanted.
    ``grad_y`` is (B, O, Ho, Wo)."""
    kernel = extension()
    assert kernel is not None, "call applies() first"
    out_channels, in_channels, k, _ = weight.shape
    matrix = tap_matrix(weight)
    # The transpose gets zero columns up to whole vectors (k*k*C = 9 or 27 on image stems).
    depth = matrix.shape[0]
    transposed = F.pad(matrix.t(), (0, -depth % VECTOR_LANES)).contiguous()
    grad_x, grad_w, grad_sim = kernel.backward(
        _nhwc(x), sim.contiguous(), matrix, transposed, _nhwc(grad_y), k, stride, padding, *needs
    )
    if needs[0]:
        grad_x = grad_x.permute(0, 3, 1, 2)
    if needs[1]:
        grad_w = grad_w.view(k, k, in_channels, out_channels).permute(3, 2, 0, 1)
    return (grad_x if needs[0] else None), (grad_w if needs[1] else None), (grad_sim if needs[2] else None)

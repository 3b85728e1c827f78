"""NSL convolution layers: exact agreement with a literal ``w^T (M9 kron I_C) x(p)``
reference, folding, gradients (incl. double backward), and torch.func use."""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator

import pytest
import torch
from torch import nn
import torch.nn.functional as F
from torch.func import functional_call, grad, replace_all_batch_norm_modules_, vmap

import fewshot_nsl.nsl.dynamic as dynamic_module
from fewshot_nsl.config import RunConfig
from fewshot_nsl.errors import UserError
from fewshot_nsl.learners import build_learner, recipe_columns
from fewshot_nsl.nsl import DynamicNSLConv2d, StaticNSLConv2d, fold_static_nsl

FORMS = ["diagonal", "full"]
# Dynamic NSL's PyTorch implementations: the chunked patch path (every full form, and
# diagonal layers with many input channels) and the planes path that diagonal
# layers with few input channels take. Tests pick each with the layer's ``path``.
# The compiled kernels of the default "fused" path: tests/test_fused_kernels.py.
DYNAMIC_PATHS = [("diagonal", "patches"), ("diagonal", "planes"), ("full", "patches")]
GEOMETRIES = [(1, 0), (1, 1), (2, 0), (2, 1)]  # (stride, padding)


def brute_force(x, weight, m9_at, stride, padding, bias=None):
    """Literal NSL score: for every output position form the patch x(p) as a
    tap-major vector of C*k*k values, build M = M9 kron I_C and evaluate
    w_o^T M x(p) (+ bias). ``m9_at(b, h, w)`` gives M9 (k*k, k*k) there."""
    batch, channels, height, width = x.shape
    out_channels, _, k, _ = weight.shape
    xp = F.pad(x, (padding,) * 4)
    out_h = (height + 2 * padding - k) // stride + 1
    out_w = (width + 2 * padding - k) // stride + 1
    w_rows = weight.permute(0, 2, 3, 1).reshape(out_channels, -1)  # w_o, tap-major
    eye_c = torch.eye(channels, dtype=x.dtype)
    y = x.new_zeros(batch, out_channels, out_h, out_w)
    for b in range(batch):
        for h in range(out_h):
            for w in range(out_w):
                patch = torch.cat([xp[b, :, h * stride + i, w * stride + j] for i in range(k) for j in range(k)])
                big_m = torch.kron(m9_at(b, h, w), eye_c)
                y[b, :, h, w] = w_rows @ big_m @ patch
    if bias is not None:
        y = y + bias.view(1, -1, 1, 1)
    return y


def m9_from_similarity(sim, form):
    if form == "diagonal":
        return lambda b, h, w: torch.diag(sim[b, :, h, w])
    return lambda b, h, w: sim[b, :, :, h, w]


def randomise_meta(layer: DynamicNSLConv2d, scale: float = 0.3) -> None:
    """Make the meta-network's last layer non-tiny so the similarity matters."""
    with torch.no_grad():
        layer.meta_out.weight.normal_(0.0, scale)
        layer.meta_out.bias.normal_(0.0, scale)


def randomise_batch_norm(layer: DynamicNSLConv2d) -> None:
    """Give the meta-network's BatchNorm a non-trivial affine map and running statistics."""
    with torch.no_grad():
        layer.meta_bn.weight.uniform_(0.5, 1.5)
        layer.meta_bn.bias.normal_(0.0, 0.3)
        layer.meta_bn.running_mean.normal_(0.0, 0.2)
        layer.meta_bn.running_var.uniform_(0.5, 2.0)


@pytest.fixture(autouse=True)
def single_thread():
    """These tensors are tiny: worker threads only add synchronisation, which
    turns into long stalls when other processes share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ``chunk_elements=1`` makes the patch path split every batch into (ragged) one-sample chunks.
MULTI_CHUNK = 1


# ----------------------------------------------------------------- static NSL


@pytest.mark.parametrize("form", FORMS)
def test_fresh_static_layer_is_the_convolution(form):
    torch.manual_seed(0)
    layer = StaticNSLConv2d(3, 8, form=form)
    x = torch.randn(4, 3, 9, 9)
    expected = F.conv2d(x, layer.weight, None, 1, 1)
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("form", FORMS)
def test_fold_matches_layer_after_random_m(form):
    torch.manual_seed(1)
    layer = StaticNSLConv2d(3, 5, stride=2, padding=1, bias=True, form=form)
    with torch.no_grad():
        layer.M.normal_()
    x = torch.randn(2, 3, 8, 7)
    folded = layer.fold()
    assert type(folded) is nn.Conv2d
    assert (folded.stride, folded.padding, folded.bias is not None) == ((2, 2), (1, 1), True)
    torch.testing.assert_close(folded(x), layer(x), atol=1e-5, rtol=1e-5)


def test_fold_static_nsl_replaces_layers_and_preserves_outputs():
    torch.manual_seed(2)
    net = nn.Sequential(
        StaticNSLConv2d(3, 6, form="full"),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Sequential(StaticNSLConv2d(6, 4, stride=2, padding=0, bias=True)),
    )
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, StaticNSLConv2d):
                module.M.add_(0.2 * torch.randn_like(module.M))
    net.eval()
    x = torch.randn(2, 3, 9, 9)
    folded = fold_static_nsl(net)
    assert not any(isinstance(m, StaticNSLConv2d) for m in folded.modules())
    assert sum(isinstance(m, nn.Conv2d) for m in folded.modules()) == 2
    assert isinstance(net[0], StaticNSLConv2d)  # the original is untouched
    torch.testing.assert_close(folded(x), net(x), atol=1e-5, rtol=1e-5)
    assert isinstance(fold_static_nsl(net[0]), nn.Conv2d)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("stride,padding", GEOMETRIES)
def test_static_matches_brute_force(form, stride, padding):
    torch.manual_seed(3)
    layer = StaticNSLConv2d(2, 3, stride=stride, padding=padding, bias=True, form=form).double()
    with torch.no_grad():
        layer.M.normal_()
    m9 = torch.diag(layer.M) if form == "diagonal" else layer.M
    x = torch.randn(2, 2, 6, 5, dtype=torch.float64)
    expected = brute_force(x, layer.weight, lambda b, h, w: m9, stride, padding, layer.bias)
    torch.testing.assert_close(layer(x), expected, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("form", FORMS)
def test_static_gradcheck(form):
    torch.manual_seed(4)
    layer = StaticNSLConv2d(2, 3, stride=2, form=form).double()
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    weight = layer.weight.detach().clone().requires_grad_()
    m = (layer.M.detach() + 0.3 * torch.randn_like(layer.M)).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w, m: functional_call(layer, {"weight": w, "M": m}, (x,)), (x, weight, m))


def test_regularization_loss():
    diagonal = StaticNSLConv2d(2, 3, form="diagonal")
    full = StaticNSLConv2d(2, 3, form="full", penalty=0.5)
    assert diagonal.regularization_loss().item() == 0.0
    assert full.regularization_loss().item() == 0.0
    with torch.no_grad():
        full.M.add_(1.0)
    loss = full.regularization_loss()
    assert loss.item() == pytest.approx(0.5 * 81.0)
    loss.backward()
    assert full.M.grad.abs().sum() > 0


# ---------------------------------------------------------------- dynamic NSL


@pytest.mark.parametrize("form,path", DYNAMIC_PATHS)
@pytest.mark.parametrize("stride,padding", GEOMETRIES)
def test_dynamic_matches_brute_force(form, path, stride, padding):
    torch.manual_seed(5)
    layer = DynamicNSLConv2d(2, 3, stride=stride, padding=padding, bias=True, form=form, hidden=4, path=path).double()
    randomise_meta(layer)
    x = torch.randn(3, 2, 6, 5, dtype=torch.float64)
    sim = layer.similarity(x)
    expected = brute_force(x, layer.weight, m9_from_similarity(sim, form), stride, padding, layer.bias)
    torch.testing.assert_close(layer(x), expected, atol=1e-10, rtol=1e-10)


def meta_network_by_loops(layer: DynamicNSLConv2d, x: torch.Tensor, training: bool) -> torch.Tensor:
    """M(x) from the definition, one scalar at a time (float64), sharing no code with ``similarity``:

    h[o,p] = sum_{c,u,v} Wm[o,c,u,v] x[c, p*s+(u,v)] / sqrt(sum_{c,u,v} x[c, p*s+(u,v)]**2 + eps)
    (zero padding), BatchNorm over (batch, positions) with the biased variance in training and
    the running statistics in eval, ReLU, g[t,p] = b[t] + sum_{o,u,v} Wout[t,o,u,v] relu(h)[o, p+(u,v)-1]
    (3x3, zero padding 1), and M = 1 + g (diagonal) or I + g reshaped k*k x k*k (full).
    """
    batch, channels, height, width = x.shape
    k, s, pad, eps = layer.kernel_size, layer.stride, layer.padding, layer.energy_eps
    hidden, outputs = layer.hidden, layer.meta_out.out_channels
    out_h, out_w = (height + 2 * pad - k) // s + 1, (width + 2 * pad - k) // s + 1
    wm, wo, bo = layer.meta_conv.weight.tolist(), layer.meta_out.weight.tolist(), layer.meta_out.bias.tolist()
    pixels = x.tolist()

    def pixel(b, c, i, j):
        return pixels[b][c][i][j] if 0 <= i < height and 0 <= j < width else 0.0

    h = [[[[0.0] * out_w for _ in range(out_h)] for _ in range(hidden)] for _ in range(batch)]
    for b in range(batch):
        for i in range(out_h):
            for j in range(out_w):
                taps = [(c, i * s + u - pad, j * s + v - pad, u, v) for c in range(channels) for u in range(k) for v in range(k)]
                energy = sum(pixel(b, c, a, d) ** 2 for c, a, d, _, _ in taps)
                for o in range(hidden):
                    h[b][o][i][j] = sum(wm[o][c][u][v] * pixel(b, c, a, d) for c, a, d, u, v in taps) / math.sqrt(energy + eps)
    bn = layer.meta_bn
    gamma, beta = bn.weight.tolist(), bn.bias.tolist()
    for o in range(hidden):
        values = [h[b][o][i][j] for b in range(batch) for i in range(out_h) for j in range(out_w)]
        if training:
            mean = sum(values) / len(values)
            variance = sum((v - mean) ** 2 for v in values) / len(values)
        else:
            mean, variance = float(bn.running_mean[o]), float(bn.running_var[o])
        scale, shift = gamma[o] / math.sqrt(variance + bn.eps), beta[o]
        for b in range(batch):
            for i in range(out_h):
                for j in range(out_w):
                    h[b][o][i][j] = max(0.0, (h[b][o][i][j] - mean) * scale + shift)
    g = torch.zeros(batch, outputs, out_h, out_w, dtype=torch.float64)
    for b in range(batch):
        for t in range(outputs):
            for i in range(out_h):
                for j in range(out_w):
                    g[b, t, i, j] = bo[t] + sum(
                        wo[t][o][u][v] * h[b][o][i + u - 1][j + v - 1]
                        for o in range(hidden) for u in range(3) for v in range(3)
                        if 0 <= i + u - 1 < out_h and 0 <= j + v - 1 < out_w
                    )  # fmt: skip
    if layer.form == "diagonal":
        return g + 1.0
    return g.unflatten(1, (k * k, k * k)) + torch.eye(k * k, dtype=torch.float64)[:, :, None, None]


@pytest.mark.parametrize("channels", [2, 5])  # diagonal: planes path up to 4 input channels, patch path above
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("stride,padding", [(1, 1), (2, 0)])
def test_meta_network_matches_its_definition_computed_by_loops(channels, form, training, stride, padding):
    torch.manual_seed(17)
    layer = DynamicNSLConv2d(channels, 3, stride=stride, padding=padding, form=form, hidden=3).double()
    randomise_meta(layer)
    randomise_batch_norm(layer)
    layer.train(training)
    x = torch.randn(2, channels, 5, 6, dtype=torch.float64)
    expected = meta_network_by_loops(layer, x, training)
    torch.testing.assert_close(layer.similarity(x), expected, atol=1e-10, rtol=1e-10)
    # and the layer's output is the NSL score under that independently computed M
    m9 = m9_from_similarity(expected, form)
    torch.testing.assert_close(layer(x), brute_force(x, layer.weight, m9, stride, padding), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("form,path", DYNAMIC_PATHS)
def test_dynamic_forward_uses_similarity(form, path, monkeypatch):
    """Swap ``similarity`` for an arbitrary field: forward must follow it."""
    torch.manual_seed(6)
    layer = DynamicNSLConv2d(2, 3, stride=2, padding=1, form=form, hidden=4, path=path, chunk_elements=MULTI_CHUNK).double()
    x = torch.randn(3, 2, 5, 6, dtype=torch.float64)
    shape = layer.similarity(x).shape
    field = torch.randn(shape, dtype=torch.float64)
    monkeypatch.setattr(layer, "similarity", lambda inp: field)
    expected = brute_force(x, layer.weight, m9_from_similarity(field, form), 2, 1)
    torch.testing.assert_close(layer(x), expected, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize(
    "form,path,chunked", [(f, p, False) for f, p in DYNAMIC_PATHS] + [("diagonal", "patches", True), ("full", "patches", True)]
)
def test_dynamic_gradcheck(form, path, chunked):
    torch.manual_seed(7)
    chunking = {"chunk_elements": MULTI_CHUNK} if chunked else {}
    layer = DynamicNSLConv2d(2, 3, stride=1, padding=1, bias=True, form=form, hidden=3, path=path, **chunking).double()
    randomise_meta(layer, 0.5)
    with torch.no_grad():  # eval mode uses these: BatchNorm becomes a fixed affine map
        layer.meta_bn.running_mean.normal_(0.0, 0.1)
        layer.meta_bn.running_var.uniform_(0.5, 1.5)
    layer.eval()
    # meta_out is a stock nn.Conv2d: checking it adds time, not coverage.
    names = ["weight", "bias", "meta_conv.weight"]
    params = {n: p.detach().clone().requires_grad_() for n, p in layer.named_parameters() if n in names}
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64, requires_grad=True)

    def run(x, *tensors):
        return functional_call(layer, dict(zip(names, tensors)), (x,))

    assert torch.autograd.gradcheck(run, (x, *[params[n] for n in names]))


def test_default_paths_and_their_pytorch_fallbacks():
    """The default route, seen in the autograd graph: the patch path and the fused
    kernels run inside the one custom Function, the planes path does not."""

    def ran_patch_path(layer: DynamicNSLConv2d) -> bool:
        y = layer(torch.randn(2, layer.in_channels, 6, 6, requires_grad=True))
        return type(y.grad_fn).__name__ == "_TapModulatedConvBackward" or any(
            type(f).__name__ == "_TapModulatedConvBackward" for f, _ in y.grad_fn.next_functions if f is not None
        )

    for channels in (1, 3):  # the kernels take diagonal stems too
        assert DynamicNSLConv2d(channels, 16, hidden=3).path == "fused"
        assert ran_patch_path(DynamicNSLConv2d(channels, 16, hidden=3))
    assert not ran_patch_path(DynamicNSLConv2d(1, 16, hidden=3, path="planes"))
    # Where the kernels do not apply (4 output channels), the faster PyTorch route.
    few, many = dynamic_module.PLANES_MAX_CHANNELS, dynamic_module.PLANES_MAX_CHANNELS + 1
    assert DynamicNSLConv2d(few, 4, hidden=3).pytorch_path == "planes" and not ran_patch_path(DynamicNSLConv2d(few, 4, hidden=3))
    assert DynamicNSLConv2d(many, 4, hidden=3).pytorch_path == "patches" and ran_patch_path(DynamicNSLConv2d(many, 4, hidden=3))
    assert DynamicNSLConv2d(few, 16, hidden=3, form="full").path == "patches"  # a full-form stem
    assert DynamicNSLConv2d(many, 16, hidden=3, form="full").path == "fused"
    assert ran_patch_path(DynamicNSLConv2d(1, 4, hidden=3, form="full"))
    assert ran_patch_path(DynamicNSLConv2d(1, 4, hidden=3, path="patches"))
    with pytest.raises(ValueError, match="'planes' for the diagonal form only"):
        DynamicNSLConv2d(1, 4, form="full", path="planes")


@pytest.mark.parametrize("stride", [1, 2])
def test_planes_and_patches_paths_agree(stride):
    """At a realistic size in float32 both diagonal paths give the same output and gradients."""
    torch.manual_seed(16)
    layer = DynamicNSLConv2d(3, 16, stride=stride, hidden=8)
    randomise_meta(layer)
    x = torch.randn(4, 3, 21, 20).contiguous(memory_format=torch.channels_last)
    results = {}
    for path in ("patches", "planes"):
        layer.path = path
        layer.zero_grad()
        x_grad = x.clone().requires_grad_()
        y = layer(x_grad)
        y.square().sum().backward()
        results[path] = (y, x_grad.grad, *[p.grad.clone() for p in layer.parameters()])
    for patches_result, planes_result in zip(results["patches"], results["planes"]):
        torch.testing.assert_close(planes_result, patches_result, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("form", FORMS)
def test_dynamic_double_backward(form):
    """MAML differentiates through gradients: check the second derivative."""
    torch.manual_seed(8)
    layer = DynamicNSLConv2d(2, 2, stride=2, padding=1, form=form, hidden=3).double()
    randomise_meta(layer, 0.5)
    layer.eval()
    sim = layer.similarity(torch.randn(2, 2, 4, 3, dtype=torch.float64)).detach()
    tap_last = (sim.permute(0, 2, 3, 1) if form == "diagonal" else sim.permute(0, 3, 4, 1, 2)).requires_grad_()
    x = torch.randn(2, 2, 4, 3, dtype=torch.float64, requires_grad=True)
    weight = layer.weight.detach().clone().requires_grad_()

    def op(x, w, s):
        return dynamic_module._TapModulatedConv.apply(x, w, s, 2, 1, False, MULTI_CHUNK)

    assert torch.autograd.gradgradcheck(op, (x, weight, tap_last))


def test_second_derivatives_finite_at_zero_pixels():
    """All-zero positions (zero padding of the data, dead ReLUs) must not turn
    MAML's second-order gradients into NaN through the patch energy."""
    torch.manual_seed(14)
    layer = DynamicNSLConv2d(2, 2, hidden=3).double().eval()
    randomise_meta(layer)
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64)
    x[:, :, 1:3, 1:3] = 0.0
    x.requires_grad_()
    assert torch.autograd.gradgradcheck(lambda x: layer.similarity(x), (x,))
    params = dict(layer.named_parameters())
    loss = layer(x).square().sum()
    grads = torch.autograd.grad(loss, list(params.values()) + [x], create_graph=True)
    second = torch.autograd.grad(sum(g.square().sum() for g in grads), list(params.values()))
    assert all(torch.isfinite(s).all() for s in second)


def test_channel_squares_match_autograd_of_the_sum_of_squares():
    """The patch energy's own Function: value, gradient and second derivative against
    autograd of ``(x * x).sum(1)`` on a channels_last input, zero pixels included."""
    generator = torch.Generator().manual_seed(15)
    x = torch.randn(2, 5, 4, 3, dtype=torch.float64, generator=generator).to(memory_format=torch.channels_last)
    x[:, :, 0, 0] = 0.0
    upstream = torch.randn(2, 1, 4, 3, dtype=torch.float64, generator=generator)
    results = []
    for squares in (dynamic_module._ChannelSquares.apply, lambda t: (t * t).sum(1, keepdim=True)):
        leaf = x.clone().requires_grad_()
        value = squares(leaf)
        (first,) = torch.autograd.grad(value, leaf, upstream, create_graph=True)
        (second,) = torch.autograd.grad(first.square().sum(), leaf)
        results.append((value, first, second))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("form", FORMS)
def test_fresh_dynamic_layer_is_nearly_the_convolution(form):
    torch.manual_seed(9)
    layer = DynamicNSLConv2d(3, 8, form=form)
    x = torch.randn(4, 3, 10, 10)
    plain = F.conv2d(x, layer.weight, None, 1, 1)

    def rel_err():
        return ((layer(x) - plain).norm() / plain.norm()).item()

    assert rel_err() < 1e-2
    randomise_meta(layer, 0.5)
    assert rel_err() > 0.1


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("stride", [1, 2])
def test_similarity_shapes(form, stride):
    layer = DynamicNSLConv2d(3, 4, stride=stride, padding=1, form=form)
    sim = layer.similarity(torch.randn(2, 3, 9, 8))
    out_hw = (9, 8) if stride == 1 else (5, 4)
    expected = (2, 9, *out_hw) if form == "diagonal" else (2, 9, 9, *out_hw)
    assert sim.shape == expected
    assert layer(torch.randn(2, 3, 9, 8)).shape == (2, 4, *out_hw)


@pytest.mark.parametrize("form", FORMS)
def test_gradients_reach_every_parameter(form):
    torch.manual_seed(10)
    static = StaticNSLConv2d(3, 4, bias=True, form=form)
    dynamic = DynamicNSLConv2d(3, 4, bias=True, form=form, hidden=5)
    randomise_meta(dynamic)
    x = torch.randn(2, 3, 6, 6)
    for layer in (static, dynamic):
        layer(x).square().sum().backward()
        for name, param in layer.named_parameters():
            assert param.grad is not None and param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("form,path", DYNAMIC_PATHS)
def test_channels_last_input(form, path):
    torch.manual_seed(11)
    x = torch.randn(3, 4, 7, 7)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    dynamic = DynamicNSLConv2d(4, 5, stride=2, form=form, hidden=6, path=path, chunk_elements=MULTI_CHUNK)
    for layer in (StaticNSLConv2d(4, 5, form=form), dynamic):
        if isinstance(layer, DynamicNSLConv2d):
            randomise_meta(layer)
        y, y_cl = layer(x), layer(x_cl)
        torch.testing.assert_close(y_cl, y, atol=1e-5, rtol=1e-5)
        assert y.is_contiguous()
        assert y_cl.is_contiguous(memory_format=torch.channels_last)
        x_grad = x_cl.clone().requires_grad_()
        layer(x_grad).sum().backward()
        x_ref = x.clone().requires_grad_()
        layer(x_ref).sum().backward()
        torch.testing.assert_close(x_grad.grad, x_ref.grad, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------- torch.func


@contextlib.contextmanager
def no_vmap_fallback() -> Iterator[None]:
    """Fail if vmap met an op without a batching rule: it would loop over tasks one by one."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    fallbacks = {str(w.message).split(".")[0] for w in caught if "batching rule" in str(w.message)}
    assert not fallbacks, f"vmap fell back to a per-task loop: {fallbacks}"


def _task_params(layer: nn.Module, tasks: int) -> dict[str, torch.Tensor]:
    """Per-task parameters, as a MAML learner holds after inner-loop steps."""
    return {n: p.detach() + 0.1 * torch.randn(tasks, *p.shape) for n, p in layer.named_parameters()}


@pytest.mark.parametrize("layer_type,form,path", [("static", f, "patches") for f in FORMS] + [("dynamic", *fp) for fp in DYNAMIC_PATHS])
def test_vmap_over_tasks_matches_loop(layer_type, form, path):
    torch.manual_seed(12)
    if layer_type == "static":
        layer: nn.Module = StaticNSLConv2d(2, 3, form=form)
    else:
        layer = DynamicNSLConv2d(2, 3, stride=2, form=form, hidden=4, path=path, chunk_elements=MULTI_CHUNK)
        randomise_meta(layer)
        replace_all_batch_norm_modules_(layer)
    tasks = 3
    params = _task_params(layer, tasks)
    xs = torch.randn(tasks, 3, 2, 6, 6)

    def forward(p, x):
        return functional_call(layer, p, (x,))

    def inner_grad(p, x):
        """Gradients for the parameters and the input (a deeper layer's input is an activation)."""
        return grad(lambda q, y: forward(q, y).square().mean(), argnums=(0, 1))(p, x)

    with no_vmap_fallback():
        batched = vmap(forward)(params, xs)
        batched_grads = vmap(inner_grad)(params, xs)
    for t in range(tasks):
        p_t = {n: v[t] for n, v in params.items()}
        torch.testing.assert_close(batched[t], forward(p_t, xs[t]), atol=1e-5, rtol=1e-5)
        g_t, gx_t = inner_grad(p_t, xs[t])
        for n in params:
            torch.testing.assert_close(batched_grads[0][n][t], g_t[n], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(batched_grads[1][t], gx_t, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("form,path", DYNAMIC_PATHS)
def test_vmapped_maml_step_second_order(form, path):
    """One inner SGD step per task under vmap, outer gradient through it.

    BatchNorm runs in eval mode here: with batch statistics, torch.func's
    batch-norm double backward under vmap is itself wrong for the weights
    feeding BatchNorm (a PyTorch issue, reproducible with plain nn.Conv2d).
    """
    torch.manual_seed(13)
    layer = DynamicNSLConv2d(2, 3, form=form, hidden=4, path=path).double().eval()
    randomise_meta(layer)
    init = {n: p.detach().clone() for n, p in layer.named_parameters()}
    xs = torch.randn(2, 2, 2, 5, 5, dtype=torch.float64)

    def task_loss(p, x):
        return functional_call(layer, p, (x,)).square().mean()

    def adapted_loss(p, x):
        g = grad(task_loss)(p, x)
        return task_loss({n: p[n] - 0.1 * g[n] for n in p}, x)

    with no_vmap_fallback():
        batched = grad(lambda p: vmap(adapted_loss, in_dims=(None, 0))(p, xs).sum())(init)
    looped = grad(lambda p: sum(adapted_loss(p, x) for x in xs))(init)
    for n in init:
        torch.testing.assert_close(batched[n], looped[n], atol=1e-9, rtol=1e-7)


# ------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    "kwargs",
    [
        {"form": "dense"},
        {"kernel_size": 2},
        {"kernel_size": 0},
        {"kernel_size": True},
        {"kernel_size": 3.0},
        {"stride": 0},
        {"padding": -1},
        {"in_channels": 0},
        {"out_channels": -2},
    ],
)
@pytest.mark.parametrize("cls", [StaticNSLConv2d, DynamicNSLConv2d])
def test_bad_arguments_raise(cls, kwargs):
    args = {"in_channels": 3, "out_channels": 4, **kwargs}
    (name,) = kwargs
    with pytest.raises(ValueError, match=f"^{name} must be"):  # the error names the bad argument
        cls(**args)


@pytest.mark.parametrize("penalty", [-1.0, float("nan"), "0.1"])
def test_bad_penalty_raises(penalty):
    with pytest.raises(ValueError, match="penalty"):
        StaticNSLConv2d(3, 4, penalty=penalty)


@pytest.mark.parametrize("hidden", [0, 2.5])
def test_bad_hidden_raises(hidden):
    with pytest.raises(ValueError, match="hidden"):
        DynamicNSLConv2d(3, 4, hidden=hidden)


def test_nsl_kernels_false_trains_dynamic_layers_on_their_pytorch_path_as_a_recipe_of_its_own() -> None:
    """``nsl_kernels: false`` (the implementation the kernels replaced) builds the same network on PyTorch ops:
    the same function to float32 rounding, and a row the leaderboard tells apart."""
    config = RunConfig(backbone="nsl-conv4", similarity="dynamic", nsl_hidden=8, width=16, device="cpu").resolve()
    on_kernels = build_learner(config, (1, 28, 28)).eval()
    pytorch_config = config.updated({"nsl_kernels": False})
    on_pytorch = build_learner(pytorch_config, (1, 28, 28)).eval()
    on_pytorch.load_state_dict(on_kernels.state_dict())

    def paths(learner: nn.Module) -> list[str]:
        return [m.path for m in learner.modules() if isinstance(m, DynamicNSLConv2d)]

    assert paths(on_kernels) == ["fused"] * 4
    assert paths(on_pytorch) == ["planes", "patches", "patches", "patches"]  # 1-channel stem: planes
    images = torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(on_pytorch.embed(images), on_kernels.embed(images), rtol=1e-4, atol=1e-5)
    assert "nsl-pytorch-ops" in recipe_columns(pytorch_config)["recipe"]
    assert "nsl-pytorch-ops" not in recipe_columns(config)["recipe"]
    assert recipe_columns(pytorch_config)["config_hash"] != recipe_columns(config)["config_hash"]
    with pytest.raises(UserError, match="dynamic NSL layers only"):
        RunConfig(backbone="nsl-conv4", nsl_kernels=False).resolve()

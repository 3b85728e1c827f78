"""The compiled kernels (fewshot_nsl.nsl.fused): they build here; the
tap-modulated convolution's forward and all three gradients agree with a
float64 reference written from the definition, on every geometry and tile
remainder; and the meta-network's evaluation kernel agrees with the
meta-network computed by loops."""

from __future__ import annotations

import os
import subprocess
import sys
from copy import deepcopy

import pytest
import torch
import torch.nn.functional as F
from torch.func import vmap

from fewshot_nsl.nsl import DynamicNSLConv2d, fused
from fewshot_nsl.nsl.dynamic import _TapModulatedConv
from tests.test_nsl_layers import (
    brute_force,
    m9_from_similarity,
    meta_network_by_loops,
    randomise_batch_norm,
    randomise_meta,
)


def reference(x: torch.Tensor, weight: torch.Tensor, sim: torch.Tensor, stride: int, padding: int) -> torch.Tensor:
    """``y[b,o,p] = sum_{c,i,j} w[o,c,i] M[b,p,i,j] x[b,c,p*s+d_j]`` by einsum over unfolded
    patches; ``sim`` tap-last, (B, Ho, Wo, T) diagonal or (B, Ho, Wo, T, T) full."""
    batch, channels = x.shape[:2]
    out_channels, _, k, _ = weight.shape
    out_h, out_w = sim.shape[1], sim.shape[2]
    patches = F.unfold(x, k, padding=padding, stride=stride).view(batch, channels, k * k, out_h, out_w)
    matrix = torch.diag_embed(sim) if sim.dim() == 4 else sim
    return torch.einsum("oci,bhwij,bcjhw->bohw", weight.reshape(out_channels, channels, k * k), matrix, patches)


def tap_last_similarity(generator: torch.Generator, batch: int, out_h: int, out_w: int, full: bool) -> torch.Tensor:
    shape = (batch, out_h, out_w, 9, 9) if full else (batch, out_h, out_w, 9)
    return 1.0 + 0.5 * torch.randn(shape, generator=generator)


def test_kernels_build_on_this_machine():
    """CI has a compiler: the kernels must build there, not silently fall back."""
    if os.environ.get(fused.SWITCH_VARIABLE) == "0":
        assert fused.extension() is None
    else:
        assert fused.extension() is not None


# (batch, in, out, height, width): tile remainders in rows (positions not a multiple
# of 6 or 24) and in columns (48 = three vectors of 16, 16 = one).
# Image stems: 1 and 3 input channels (k*k*C = 9, 27: G's rows padded to whole vectors).
# 64 channels at 32x32 are 256 KiB a sample: the diagonal kernels take such
# samples through their tap classes two at a time (kCachedSampleBytes).
SHAPES = [(2, 16, 16, 5, 7), (3, 32, 48, 9, 8), (1, 64, 64, 6, 6), (5, 16, 32, 4, 11), (2, 1, 16, 7, 6), (3, 3, 32, 6, 5),
          (5, 64, 16, 32, 32)]


@pytest.mark.parametrize("full", [False, True])
# Padding 2 leaves border windows a single kernel row or column inside the
# image, padding 3 some windows none (their outputs are zero).
@pytest.mark.parametrize("stride,padding", [(1, 1), (1, 0), (2, 1), (2, 0), (1, 2), (2, 3)])
@pytest.mark.parametrize("batch,channels,out_channels,height,width", SHAPES)
def test_fused_matches_float64_reference(full, stride, padding, batch, channels, out_channels, height, width):
    generator = torch.Generator().manual_seed(batch * 100 + channels + stride + padding)
    x = torch.randn(batch, channels, height, width, generator=generator)
    weight = torch.randn(out_channels, channels, 3, 3, generator=generator) / (3 * channels**0.5)
    out_h, out_w = (height + 2 * padding - 3) // stride + 1, (width + 2 * padding - 3) // stride + 1
    sim = tap_last_similarity(generator, batch, out_h, out_w, full)
    assert fused.applies(x, weight, sim)
    inputs = [t.clone().requires_grad_() for t in (x, weight, sim)]
    y = _TapModulatedConv.apply(*inputs, stride, padding, False, 1 << 20, True)
    upstream = torch.randn(y.shape, generator=generator)
    grads = torch.autograd.grad(y, inputs, upstream)
    exact = [t.double().requires_grad_() for t in (x, weight, sim)]
    y_exact = reference(*exact, stride, padding)
    grads_exact = torch.autograd.grad(y_exact, exact, upstream.double())
    for got, want in zip((y, *grads), (y_exact, *grads_exact)):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("channels", [1, 3])
def test_outputs_past_the_streaming_threshold_match_the_reference(channels):
    """Stem outputs larger than STREAMED_OUTPUT_BYTES are written with streaming stores."""
    generator = torch.Generator().manual_seed(channels)
    batch, size, out_channels = 180, 28, 64
    assert batch * size * size * out_channels * 4 > fused.STREAMED_OUTPUT_BYTES
    x = torch.randn(batch, channels, size, size, generator=generator)
    weight = torch.randn(out_channels, channels, 3, 3, generator=generator)
    sim = tap_last_similarity(generator, batch, size, size, full=False)
    y = fused.forward(x, weight, sim, 1, 1).permute(0, 3, 1, 2)
    expected = reference(x.double(), weight.double(), sim.double(), 1, 1)
    torch.testing.assert_close(y.double(), expected, rtol=1e-4, atol=1e-4)


def test_fused_is_deterministic_and_independent_of_thread_count():
    """The weight gradient sums per-thread partials in a fixed order; one thread gives the same up to rounding."""
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(7, 32, 8, 8, generator=generator)
    weight = torch.randn(32, 32, 3, 3, generator=generator)
    sim = tap_last_similarity(generator, 7, 8, 8, False)
    upstream = torch.randn(7, 32, 8, 8, generator=generator)

    def run() -> list[torch.Tensor]:
        inputs = [t.clone().requires_grad_() for t in (x, weight, sim)]
        y = _TapModulatedConv.apply(*inputs, 1, 1, False, 1 << 20, True)
        return [y.detach(), *torch.autograd.grad(y, inputs, upstream)]

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        first, second = run(), run()
        torch.set_num_threads(1)
        single = run()
    finally:
        torch.set_num_threads(threads)
    for a, b, c in zip(first, second, single):
        assert torch.equal(a, b)
        torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-4)


def test_applies_only_where_the_kernels_can_run():
    x, weight, sim = torch.randn(2, 16, 5, 5), torch.randn(16, 16, 3, 3), torch.rand(2, 5, 5, 9)
    assert fused.applies(x, weight, sim)
    assert not fused.applies(x.double(), weight.double(), sim.double())  # float32 only
    assert not fused.applies(x, torch.randn(12, 16, 3, 3), sim)  # output channels in whole vectors of 16
    seen: list[bool] = []

    def probe(x_task: torch.Tensor) -> torch.Tensor:
        seen.append(fused.applies(x_task, weight, sim[0]))
        return x_task.sum()

    vmap(probe)(x.unsqueeze(1))
    assert seen == [False]  # vmap's batched tensors take the PyTorch path


@pytest.mark.parametrize("channels,hidden", [(1, 3), (3, 20), (5, 16)])
@pytest.mark.parametrize("form", ["diagonal", "full"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("stride,padding", [(1, 1), (2, 0)])
def test_evaluation_meta_network_matches_its_definition_computed_by_loops(channels, hidden, form, training, stride, padding):
    """Without a graph, the fused path's meta-network runs its normalisation (and,
    on running statistics, BatchNorm and ReLU) in the kernel: it must still be the
    meta-network of the definition, in both BatchNorm modes, with all-zero patches."""
    torch.manual_seed(18)
    layer = DynamicNSLConv2d(channels, 16, stride=stride, padding=padding, form=form, hidden=hidden, path="fused")
    randomise_meta(layer)
    randomise_batch_norm(layer)
    layer.train(training)
    x = torch.randn(2, channels, 7, 6)
    x[0, :, :4, :4] = 0.0  # patches of zeros: the energy is eps alone
    expected = meta_network_by_loops(deepcopy(layer).double(), x.double(), training)
    with torch.no_grad():
        assert fused.meta_hidden_applies(x, layer.meta_conv.weight)
        got = layer.similarity(x)
        output = layer(x)  # and the forward without a graph: the kernels called directly
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4)
    m9 = m9_from_similarity(expected, form)
    torch.testing.assert_close(
        output.double(), brute_force(x.double(), layer.weight.double(), m9, stride, padding), rtol=1e-4, atol=1e-4
    )


# Above DIRECT_META_MAX_CHANNELS: oneDNN's convolution, then the kernel; at or below
# it (stems): the kernel alone (3 channels: windows read in place between patch-row
# borders; 1 channel: patch rows), with hidden in whole vectors or not (20), stride 2,
# an image smaller than the kernel's reach (2x2: no window inside it), and a hidden
# output past STREAMED_OUTPUT_BYTES (streaming stores).
META_HIDDEN_CASES = [(6, 64, 16, 14, 1), (6, 64, 24, 9, 2), (6, 5, 16, 9, 1), (6, 3, 32, 21, 1), (6, 1, 20, 9, 2),
                     (6, 3, 20, 10, 2), (6, 3, 16, 2, 1), (6, 4, 16, 7, 1), (180, 1, 64, 28, 1)]  # fmt: skip


@pytest.mark.parametrize("batch,channels,hidden,size,stride", META_HIDDEN_CASES)
def test_meta_hidden_matches_float64_pytorch_ops(batch, channels, hidden, size, stride):
    """At layer sizes (vector loops over 64 channels and whole hidden vectors) and on
    stems, the kernel equals conv / patch norm, then the affine map and ReLU, in
    float64 PyTorch ops."""
    generator = torch.Generator().manual_seed(channels + hidden)
    x = torch.randn(batch, channels, size, size, generator=generator).to(memory_format=torch.channels_last)
    weight = torch.randn(hidden, channels, 3, 3, generator=generator) / (3 * channels**0.5)
    scale, shift = torch.rand(hidden, generator=generator) + 0.5, torch.randn(hidden, generator=generator)
    x64, w64 = x.double(), weight.double()
    energy = F.conv2d(x64.square().sum(1, keepdim=True), torch.ones(1, 1, 3, 3, dtype=torch.float64), None, stride, 1)
    normalised = F.conv2d(x64, w64, None, stride, 1) * torch.rsqrt(energy + 1e-6)
    affine = torch.relu(normalised * scale.double()[:, None, None] + shift.double()[:, None, None])
    with torch.no_grad():
        torch.testing.assert_close(fused.meta_hidden(x, weight, 1e-6, stride, 1).double(), normalised, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(
            fused.meta_hidden(x, weight, 1e-6, stride, 1, scale, shift).double(), affine, rtol=1e-4, atol=1e-5
        )


def test_the_meta_hidden_cases_cover_both_routes_and_streaming():
    direct = [case for case in META_HIDDEN_CASES if case[1] <= fused.DIRECT_META_MAX_CHANNELS]
    assert 0 < len(direct) < len(META_HIDDEN_CASES)
    assert any(hidden % fused.VECTOR_LANES for _, _, hidden, _, _ in direct)
    assert any(b * h * s * s * 4 > fused.STREAMED_OUTPUT_BYTES for b, _, h, s, _ in direct)


@pytest.mark.parametrize("channels,stride,padding,input_grad", [(16, 1, 1, True), (16, 2, 0, True), (3, 1, 1, False),
                                                              (1, 2, 1, False), (5, 1, 1, True)])  # fmt: skip
def test_training_meta_network_gradients_match_float64_autograd(channels, stride, padding, input_grad):
    """With a graph, the fused path's first meta-network stage is the kernels'
    autograd Function (energy and convolution gradients by hand); every
    gradient through the similarity matches float64 autograd of the PyTorch
    ops, all-zero patches included, with and without an input gradient (stems)."""
    torch.manual_seed(21)
    layer = DynamicNSLConv2d(channels, 16, stride=stride, padding=padding, hidden=20, path="fused").train()
    randomise_meta(layer)
    randomise_batch_norm(layer)
    exact = deepcopy(layer).double()
    exact.path = "patches"
    x = torch.randn(3, channels, 9, 8)
    x[0, :, :4, :4] = 0.0
    upstream = torch.randn(layer.similarity(x).shape, generator=torch.Generator().manual_seed(22))
    grads = {}
    for name, model, inputs in (("fused", layer, x), ("exact", exact, x.double())):
        inputs = inputs.clone().requires_grad_(input_grad)
        wrt = [model.meta_conv.weight, model.meta_bn.weight, model.meta_bn.bias, model.meta_out.weight]
        grads[name] = torch.autograd.grad(model.similarity(inputs), wrt + [inputs] * input_grad, upstream.to(inputs))
    for got, expected in zip(grads["fused"], grads["exact"], strict=True):
        torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-5)


def test_meta_hidden_applies_only_without_a_graph():
    x, weight = torch.randn(2, 3, 5, 5), torch.randn(8, 3, 3, 3)
    assert not fused.meta_hidden_applies(x, weight)  # grad mode on: autograd needs the PyTorch ops
    with torch.no_grad():
        assert fused.meta_hidden_applies(x, weight)
        assert not fused.meta_hidden_applies(x.double(), weight.double())  # float32 only


def operators_run(layer: DynamicNSLConv2d, x: torch.Tensor) -> dict[str, int]:
    """The operators one forward calls, with their counts."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as trace:
        layer(x)
    return {event.key: event.count for event in trace.key_averages()}


def test_evaluation_takes_the_kernels_and_training_the_pytorch_meta_network():
    """Seen in the operator trace: in evaluation without a graph, BatchNorm runs inside
    the meta-network kernel and the modulated convolution skips the autograd Function;
    with a graph, both run as before."""
    layer = DynamicNSLConv2d(16, 16, hidden=4).eval()
    x = torch.randn(2, 16, 6, 6)
    with torch.no_grad():
        evaluation = operators_run(layer, x)
    recorded = operators_run(layer, x)
    assert "aten::native_batch_norm" not in evaluation and "_TapModulatedConv" not in evaluation
    assert "aten::native_batch_norm" in recorded and "_TapModulatedConv" in recorded
    assert "_NormalisedConv" in recorded and "_NormalisedConv" not in evaluation
    # The meta-network's first and output convolutions; no box-sum convolution for the energy.
    assert evaluation["aten::convolution"] == recorded["aten::convolution"] == 2


def test_on_stems_the_meta_networks_first_convolution_runs_in_the_kernel():
    """On an image stem, only the meta-network's output convolution is left to oneDNN."""
    layer = DynamicNSLConv2d(3, 16, hidden=4).eval()
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        assert operators_run(layer, x)["aten::convolution"] == 1
    recorded = operators_run(layer, x)  # with a graph: the same, in the kernels' autograd Function
    assert recorded["aten::convolution"] == 1 and "_NormalisedConv" in recorded


@pytest.mark.parametrize("form", ["diagonal", "full"])
def test_fused_layer_double_backward_and_vmap_match_patch_path(form):
    """Double backward and vmap leave the kernels for the PyTorch path; second-order
    gradients (the layer's kernel, the meta-network's first convolution) match
    float64 on the patch path to float32 rounding of their scale, and vmap the
    float32 patch path."""
    torch.manual_seed(4)
    layers = {path: DynamicNSLConv2d(16, 16, form=form, hidden=4, path=path) for path in ("fused", "patches")}
    layers["fused"].load_state_dict(layers["patches"].state_dict())
    for layer in layers.values():
        with torch.no_grad():
            layer.meta_out.weight.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(5))
    x = torch.randn(3, 16, 6, 6)
    second_order = {}
    for name, layer, inputs in (("fused", layers["fused"], x), ("exact", deepcopy(layers["patches"]).double(), x.double())):
        xg = inputs.clone().requires_grad_()
        (gx,) = torch.autograd.grad(layer(xg).square().sum(), xg, create_graph=True)
        second_order[name] = torch.autograd.grad(gx.square().sum(), (layer.weight, layer.meta_conv.weight))
    for got, exact in zip(second_order["fused"], second_order["exact"], strict=True):
        # Entries span orders of magnitude: float32 rounding is relative to the largest.
        torch.testing.assert_close(got.double(), exact, rtol=1e-4, atol=1e-5 * exact.abs().max().item())
    layers["patches"].load_state_dict(layers["fused"].state_dict())  # the running statistics of that pass
    batched = vmap(layers["fused"].eval())(x.view(3, 1, 16, 6, 6))
    torch.testing.assert_close(batched.squeeze(1), layers["patches"].eval()(x), rtol=1e-5, atol=1e-5)


def test_a_failed_build_warns_once_and_falls_back_to_pytorch(tmp_path):
    """No working compiler: one warning, and the layer computes the function the kernels compute here, in PyTorch."""
    if os.environ.get(fused.SWITCH_VARIABLE) == "0":
        pytest.skip(f"{fused.SWITCH_VARIABLE}=0: no kernels here to compute the output the fallback must match")
    torch.manual_seed(0)
    layer = DynamicNSLConv2d(16, 16, hidden=4)
    x = torch.randn(2, 16, 5, 5, generator=torch.Generator().manual_seed(1))
    state = deepcopy(layer.state_dict())  # before the training-mode forward moves the running statistics
    assert fused.extension() is not None and layer.path == "fused"
    torch.save({"state": state, "x": x, "fused": layer(x).detach()}, tmp_path / "fused.pt")
    script = (
        "import sys, warnings, torch\n"
        "from fewshot_nsl.nsl import DynamicNSLConv2d, fused\n"
        "saved = torch.load(sys.argv[1], weights_only=True)\n"
        "layer = DynamicNSLConv2d(16, 16, hidden=4)\n"
        "layer.load_state_dict(saved['state'])\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    y = layer(saved['x'])\n"
        "    layer(saved['x'])\n"
        "assert fused.extension() is None and layer.path == 'fused'\n"
        "messages = [str(w.message) for w in caught if 'did not build' in str(w.message)]\n"
        "assert len(messages) == 1, messages\n"
        "torch.testing.assert_close(y, saved['fused'], rtol=1e-5, atol=1e-5)\n"
        "print('fell back')\n"
    )
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    env.pop(fused.SWITCH_VARIABLE, None)
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "fused.pt")], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "fell back" in done.stdout

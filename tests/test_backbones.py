"""Backbones: every similarity variant builds, runs, folds, and has the parameters it should."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fewshot_nsl.backbones import build_backbone, parameter_count, resolve_similarity
from fewshot_nsl.backbones.resnet12 import DropBlock
from fewshot_nsl.backbones.similarity import Similarity
from fewshot_nsl.cli.main import run
from fewshot_nsl.errors import UserError
from fewshot_nsl.nsl import DynamicNSLConv2d, StaticNSLConv2d, fold_static_nsl
from fewshot_nsl.runtime import seeded


def conv4_parameters(in_channels: int, extra_per_layer) -> int:
    """Conv-4 by hand: 3×3 kernels without bias, BatchNorm (2 per channel), plus NSL extras per layer."""
    channels = [in_channels, 64, 64, 64]
    return sum(c * 64 * 9 + 2 * 64 + extra_per_layer(c) for c in channels)


EXPECTED_CONV4 = {
    "conv": conv4_parameters(1, lambda c: 0),
    "static-diagonal": conv4_parameters(1, lambda c: 9),
    "static-full": conv4_parameters(1, lambda c: 81),
    # meta-network: conv3×3 C→64 (no bias), BN(64), conv3×3 64→9 (+bias) or 64→81 (+bias)
    "dynamic-diagonal-h64": conv4_parameters(1, lambda c: c * 64 * 9 + 128 + 64 * 9 * 9 + 9),
    "dynamic-full-h64": conv4_parameters(1, lambda c: c * 64 * 9 + 128 + 64 * 81 * 9 + 81),
}


def test_info_prints_parameter_counts(capsys):
    assert run(["info", "--backbone", "conv4", "nsl-conv4"]) == 0
    lines = capsys.readouterr().out.splitlines()[1:]
    printed = {line.split()[1]: int(line.split()[2].replace(",", "")) for line in lines}
    assert printed == EXPECTED_CONV4
    assert EXPECTED_CONV4["conv"] == 111_680  # the Conv-4 of Snell et al. on 1-channel input


def resnet12_parameters(widths: tuple[int, ...], in_channels: int = 3) -> int:
    """Per block: three 3×3 convs, three BatchNorms, a 1×1 shortcut conv and its BatchNorm (no biases)."""
    total, previous = 0, in_channels
    for w in widths:
        total += previous * w * 9 + 2 * w * w * 9 + 3 * 2 * w + previous * w + 2 * w
        previous = w
    return total


@pytest.mark.parametrize("name,widths,features", [("resnet12", (64, 160, 320, 640), 640), ("resnet12-512", (64, 128, 256, 512), 512)])
def test_resnet12_variants_have_their_published_size(name, widths, features):
    model = build_backbone(name, (3, 84, 84))
    assert parameter_count(model) == resnet12_parameters(widths)
    assert model.out_features == features and model(torch.randn(2, 3, 84, 84)).shape == (2, features)
    if name == "resnet12":
        assert round(parameter_count(model) / 1e6, 1) == 12.4  # MetaOptNet / FEAT's ResNet-12


def test_resnet12_size_and_output():
    model = build_backbone("resnet12", (3, 32, 32))
    assert 12_000_000 < parameter_count(model) < 12_600_000  # ~12.4M as in MetaOptNet
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 640)
    nsl = build_backbone("nsl-resnet12", (3, 32, 32), Similarity("static"))
    layers = [m for m in nsl.modules() if isinstance(m, StaticNSLConv2d)]
    assert len(layers) == 12  # every 3×3 convolution; the 1×1 shortcuts stay plain


@pytest.mark.parametrize("kind", ["conv", "static", "dynamic"])
@pytest.mark.parametrize("form", ["diagonal", "full"])
def test_conv4_variants_run_and_fold(kind, form):
    name = "conv4" if kind == "conv" else "nsl-conv4"
    with seeded(0):
        model = build_backbone(name, (1, 28, 28), Similarity(kind, form, hidden=16)).eval()
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for m in model.modules():  # move NSL away from its identity start so folding is tested for real
            if isinstance(m, StaticNSLConv2d):
                m.M.add_(0.1 * torch.randn(m.M.shape, generator=torch.Generator().manual_seed(2)))
        out = model(x)
        folded = fold_static_nsl(model)
        assert torch.allclose(folded(x), out, atol=1e-5)
    assert out.shape == (4, 64)
    assert not any(isinstance(m, StaticNSLConv2d) for m in folded.modules())
    assert any(isinstance(m, DynamicNSLConv2d) for m in folded.modules()) == (kind == "dynamic")


def test_plain_stem_keeps_first_layer_plain():
    model = build_backbone("nsl-conv4", (1, 28, 28), Similarity("static"), plain_stem=True)
    convs = [m for m in model.modules() if isinstance(m, (nn.Conv2d, StaticNSLConv2d))]
    assert type(convs[0]) is nn.Conv2d and all(isinstance(m, StaticNSLConv2d) for m in convs[1:])


def test_seeded_construction_is_reproducible_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    with seeded(4):
        a = build_backbone("conv4", (1, 28, 28))
    with seeded(4):
        b = build_backbone("conv4", (1, 28, 28))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_seeded_initialises_as_torch_manual_seed_did_and_leaves_device_generators_alone():
    """Committed results were initialised under ``torch.manual_seed``: ``seeded`` seeds the CPU generator
    alone, with the same values, and no CUDA generator is reseeded as a side effect."""
    cuda = torch.cuda.is_available()
    cuda_state = torch.cuda.get_rng_state() if cuda else None
    with seeded(4):
        a = build_backbone("nsl-conv4", (3, 84, 84), resolve_similarity("nsl-conv4", "dynamic"))
    if cuda:
        assert torch.equal(torch.cuda.get_rng_state(), cuda_state)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4)
        b = build_backbone("nsl-conv4", (3, 84, 84), resolve_similarity("nsl-conv4", "dynamic"))
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_similarity_choices_and_errors():
    assert resolve_similarity("nsl-conv4", None).label == "static-diagonal"
    assert resolve_similarity("nsl-conv4", "dynamic", "full").label == "dynamic-full-h64"
    assert resolve_similarity("nsl-conv4", "dynamic", "diagonal", 16).label == "dynamic-diagonal-h16"
    assert resolve_similarity("conv4", None).label == "conv"
    with pytest.raises(UserError, match="needs an NSL backbone"):
        resolve_similarity("conv4", "static")
    with pytest.raises(UserError, match="plain network"):
        resolve_similarity("nsl-conv4", "conv")
    with pytest.raises(UserError, match="unknown backbone"):
        resolve_similarity("vgg", None)
    with pytest.raises(UserError, match="too small"):
        build_backbone("conv4", (1, 8, 8))


def test_dropblock_drops_blocks_reproducibly_and_only_in_training():
    x = torch.ones(2, 4, 10, 10)
    drop = DropBlock(0.2, 3, torch.Generator().manual_seed(0))
    first = drop(x)
    drop.generator.manual_seed(0)
    assert torch.equal(first, drop(x))
    assert 0.05 < (first == 0).float().mean() < 0.5
    assert torch.equal(drop.eval()(x), x)


def test_dropblock_masks_come_from_a_named_generator_or_none_are_built():
    with pytest.raises(ValueError, match="generator"):  # never torch's global generator
        build_backbone("resnet12-512", (3, 16, 16), drop_rate=0.1)
    generator = torch.Generator().manual_seed(0)
    model = build_backbone("resnet12-512", (3, 16, 16), drop_rate=0.1, generator=generator)
    assert [m.generator for m in model.modules() if isinstance(m, DropBlock)] == [generator, generator]

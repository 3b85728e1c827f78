"""Singular-value spectra of a backbone's layers, and a distance between runs' spectra.

Colombo & Gao (2020) compare architectures (standard, {0,1}-weight, random, pruned) by the
spectra of their weight matrices. Here each convolution's kernel (O, C, k, k) is read as the
O x (C·k·k) matrix that multiplies an input patch, the usual reshaping:

- a plain convolution: its weight; a ``binary`` one: the {0,1} kernel it computes with;
- static NSL: the folded kernel ``W' = w M9`` (what the layer applies; ``StaticNSLConv2d.folded_weight``);
- dynamic NSL: the base kernel ``w`` only, since the tap mixing depends on the input; the
  meta-network's own small convolutions are left out, so that every backbone contributes the
  same layers and runs of different similarities can be compared layer by layer.

The distance compares spectra scaled to unit Euclidean norm, because every layer here is
followed by BatchNorm, which makes a kernel's overall scale irrelevant to what the network
computes (a {0,1} kernel and a real one differ in scale by orders of magnitude):
``d(a, b) = mean over layers l of || s_a(l)/||s_a(l)|| - s_b(l)/||s_b(l)|| ||_2``.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch
from torch import nn

from fewshot_nsl.errors import UserError
from fewshot_nsl.nsl import DynamicNSLConv2d, StaticNSLConv2d


def layer_matrices(backbone: nn.Module) -> dict[str, torch.Tensor]:
    """The weight matrix of every convolution (and linear layer), by module name, in build order."""
    matrices: dict[str, torch.Tensor] = {}
    inside_dynamic: list[str] = []
    for name, module in backbone.named_modules():
        if any(name.startswith(prefix + ".") for prefix in inside_dynamic):
            continue  # a dynamic layer's meta-network
        if isinstance(module, StaticNSLConv2d):
            kernel = module.folded_weight()
        elif isinstance(module, DynamicNSLConv2d):
            inside_dynamic.append(name)
            kernel = module.weight
        elif isinstance(module, (nn.Conv2d, nn.Linear)):
            kernel = module.weight
        else:
            continue
        matrices[name] = kernel.detach().flatten(1)
    return matrices


def singular_values(backbone: nn.Module) -> dict[str, torch.Tensor]:
    """Descending singular values of each layer's matrix, computed in float64."""
    return {name: torch.linalg.svdvals(matrix.double().cpu()) for name, matrix in layer_matrices(backbone).items()}


def spectrum_distance(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> float:
    """Mean over layers of the Euclidean distance between unit-norm spectra (see the module docstring).

    Layers are paired by position; runs whose layers differ in number or shape are refused.
    """
    if len(first) != len(second):
        raise UserError(f"the runs have {len(first)} and {len(second)} layers; spectra compare runs of one architecture")
    distances = []
    for (name_a, a), (name_b, b) in zip(first.items(), second.items()):
        if a.shape != b.shape:
            raise UserError(f"layer {name_a} has {a.numel()} singular values and {name_b} {b.numel()}; "
                            "spectra compare runs of one architecture")  # fmt: skip
        distances.append(torch.linalg.vector_norm(_unit(a) - _unit(b)))
    return float(torch.stack(distances).mean())


def _unit(values: torch.Tensor) -> torch.Tensor:
    return values / torch.linalg.vector_norm(values).clamp_min(torch.finfo(values.dtype).tiny)


def write_spectra(spectra: dict[str, dict[str, torch.Tensor]], out: Path) -> pd.DataFrame:
    """``spectra.csv`` (run, layer, index, singular value), ``distances.csv`` (run × run) and
    ``spectra.png`` (one panel per layer, one line per run, unit-norm spectra on a log scale).

    Returns the distance matrix, computed first: runs of different architectures are refused before
    anything is written.
    """
    runs = list(spectra)
    distances = pd.DataFrame(
        [[spectrum_distance(spectra[a], spectra[b]) for b in runs] for a in runs], index=runs, columns=runs
    )
    out.mkdir(parents=True, exist_ok=True)
    rows = [
        {"run": run, "layer": layer, "index": index, "singular_value": float(value)}
        for run, layers in spectra.items()
        for layer, values in layers.items()
        for index, value in enumerate(values)
    ]
    pd.DataFrame(rows).to_csv(out / "spectra.csv", index=False)
    distances.to_csv(out / "distances.csv", index_label="run")
    _plot(spectra, out / "spectra.png")
    return distances


def _plot(spectra: dict[str, dict[str, torch.Tensor]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = next(iter(spectra.values()))
    columns = min(4, len(first))
    rows = -(-len(first) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 2.6 * rows), squeeze=False)
    for position, layer in enumerate(first):
        axis = axes[position // columns][position % columns]
        for run, layers in spectra.items():
            values = list(layers.values())[position]
            axis.semilogy(_unit(values).numpy(), label=run, lw=1.2)
        axis.set_title(layer, fontsize=8)
        axis.set_xlabel("index", fontsize=7)
        axis.tick_params(labelsize=7)
    for empty in range(len(first), rows * columns):
        axes[empty // columns][empty % columns].axis("off")
    axes[0][0].set_ylabel("singular value / norm", fontsize=7)
    axes[0][0].legend(fontsize=6)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)

"""Neural anisotropy directions (Ortiz-Jiménez, Modas, Moosavi-Dezfooli & Frossard, NeurIPS 2020).

The gradient covariance method: over many random initialisations θ of a network f_θ (a backbone
with a random linear readout to one logit), estimate Σ = E_θ[∇ₓf_θ(x₀) ∇ₓf_θ(x₀)ᵀ] at one fixed
input x₀ and eigendecompose it. Eigenvectors with large eigenvalues are the input directions
the architecture is, at initialisation, most sensitive along (the paper links them to the
directions it learns to separate easily). For RGB inputs Σ is estimated per channel (C
covariances of side² × side²), which keeps the eigendecomposition tractable at 84 px.

Input gradients of a whole batch of initialisations come from one ``torch.func`` pass: the
initialisations' parameters are stacked (``stack_module_state``) and ``vmap`` maps
``grad(functional_call)`` over them. Every initialisation draws from a named generator seeded
by (seed, index), and x₀ from one seeded by the seed alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call, grad, stack_module_state, vmap

from fewshot_nsl.errors import UserError

INIT_CHUNK = 64  # initialisations whose gradients are taken in one vmap (bounds the stacked parameters)


class ScalarReadout(nn.Module):
    """A backbone followed by a random linear map of its features to one logit."""

    def __init__(self, backbone: nn.Module, features: int, generator: torch.Generator):
        super().__init__()
        self.backbone = backbone
        self.readout = nn.Parameter(torch.randn(features, generator=generator) / features**0.5)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """One logit per image of (B, C, H, W), or a scalar for one image (C, H, W)."""
        single = images.dim() == 3
        logits = self.backbone(images.unsqueeze(0) if single else images).flatten(1) @ self.readout
        return logits.squeeze(0) if single else logits


@dataclass(frozen=True)
class NADs:
    """Eigenvalues (C, D) in decreasing order and eigenvectors (C, D, side, side), per input channel."""

    eigenvalues: torch.Tensor
    directions: torch.Tensor


def input_gradients(
    build: Callable[[torch.Generator], nn.Module], x0: torch.Tensor, samples: int, seed: int
) -> torch.Tensor:
    """∇ₓf_θ(x₀) for ``samples`` initialisations θ, (samples, C, H, W). ``build(generator)`` returns
    a fresh network with one scalar output; it is put in eval mode (BatchNorm at its initial
    identity statistics, so one input is a valid batch)."""
    gradients = []
    for start in range(0, samples, INIT_CHUNK):
        models = [build(torch.Generator().manual_seed(_init_seed(seed, i))).eval() for i in range(start, min(start + INIT_CHUNK, samples))]
        params, buffers = stack_module_state(models)
        template = models[0]

        def scalar(p: dict, b: dict, image: torch.Tensor) -> torch.Tensor:
            return functional_call(template, (p, b), (image,))

        gradients.append(vmap(grad(scalar, argnums=2), in_dims=(0, 0, None))(params, buffers, x0).detach())
    return torch.cat(gradients)


def anisotropy_directions(gradients: torch.Tensor) -> NADs:
    """Eigendecomposition of the per-channel gradient covariance E[g gᵀ] (uncentred, as the paper's Σ)."""
    count, channels, height, width = gradients.shape
    flat = gradients.double().reshape(count, channels, height * width).transpose(0, 1)  # (C, n, D)
    covariance = flat.transpose(1, 2) @ flat / count
    values, vectors = torch.linalg.eigh(covariance)  # ascending
    order = torch.arange(values.shape[-1] - 1, -1, -1)
    directions = vectors[..., order].transpose(1, 2).reshape(channels, -1, height, width)
    return NADs(values[..., order].float(), directions.float())


def fourier_magnitude(direction: torch.Tensor) -> torch.Tensor:
    """|DFT| of a direction (side, side), zero frequency centred: where in frequency it lies."""
    return torch.fft.fftshift(torch.fft.fft2(direction).abs())


def evaluation_point(channels: int, side: int, seed: int) -> torch.Tensor:
    """x₀: a standard normal image from the seed (a point of the standardised input distribution's scale)."""
    return torch.randn(channels, side, side, generator=torch.Generator().manual_seed(seed))


def _init_seed(seed: int, index: int) -> int:
    return seed * 1_000_003 + index


def write_report(nads: NADs, out: Path, top: int) -> None:
    """``spectrum.csv`` (channel, rank, eigenvalue), ``spectrum.png`` and ``nads.png``: the ``top``
    leading directions of every channel above their Fourier magnitudes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    channels, count = nads.eigenvalues.shape
    with open(out / "spectrum.csv", "w") as handle:
        handle.write("channel,rank,eigenvalue\n")
        for c in range(channels):
            handle.writelines(f"{c},{r},{v:.8g}\n" for r, v in enumerate(nads.eigenvalues[c].tolist()))
    figure, axis = plt.subplots(figsize=(5, 3.5))
    for c in range(channels):
        axis.semilogy(nads.eigenvalues[c].clamp_min(1e-12).numpy(), label=f"channel {c}" if channels > 1 else None)
    axis.set_xlabel("rank")
    axis.set_ylabel("eigenvalue of the gradient covariance")
    if channels > 1:
        axis.legend()
    figure.tight_layout()
    figure.savefig(out / "spectrum.png", dpi=120)
    plt.close(figure)
    top = min(top, count)
    figure, axes = plt.subplots(2 * channels, top, figsize=(1.2 * top, 2.4 * channels), squeeze=False)
    for c in range(channels):
        for r in range(top):
            direction = nads.directions[c, r]
            axes[2 * c, r].imshow(direction.numpy(), cmap="RdBu")
            axes[2 * c + 1, r].imshow(fourier_magnitude(direction).numpy(), cmap="viridis")
            axes[2 * c, r].set_title(str(r), fontsize=7)
    for axis in axes.flat:
        axis.set_axis_off()
    figure.tight_layout()
    figure.savefig(out / "nads.png", dpi=120)
    plt.close(figure)


def dct_direction(side: int, row_frequency: int, column_frequency: int) -> torch.Tensor:
    """The orthonormal 2-D DCT-II basis image of the given frequencies (side, side), unit norm."""

    def axis(frequency: int) -> torch.Tensor:
        n = torch.arange(side, dtype=torch.float64)
        vector = torch.cos(torch.pi * (2 * n + 1) * frequency / (2 * side))
        return vector / vector.norm()

    return (axis(row_frequency)[:, None] * axis(column_frequency)[None, :]).float()


@dataclass(frozen=True)
class SeparabilityRecipe:
    """The directional separability test's data and training, by default the paper's.

    Source: the authors' reference code, github.com/LTS4/neural-anisotropy-directions
    (``directional_bias.py``: 10,000 training and 10,000 test samples, noise σ = 3, classes at
    ±ε/2·v with ε = 1, batches of 128; ``utils.train``: 20 epochs of SGD without momentum or
    weight decay, learning rate decayed linearly from 0.5 to 0 over the batches, gradient norm
    clipped at 0.5). In this module's form x = ε·y·v + ξ that is ``epsilon = 0.5``. One
    difference is kept: the readout is one logit with a logistic loss (the reference uses two
    logits and cross-entropy), as for the covariance method.
    """

    epsilon: float = 0.5
    noise: float = 3.0
    train_samples: int = 10_000
    test_samples: int = 10_000
    batch: int = 128
    epochs: int = 20
    lr: float = 0.5
    clip: float = 0.5

    def check(self) -> None:
        counts = (self.train_samples, self.test_samples, self.batch, self.epochs)
        if min(counts) < 1 or self.epsilon <= 0 or self.noise < 0 or self.lr <= 0 or self.clip <= 0:
            raise UserError("separability: samples, batch and epochs must be >= 1; epsilon, lr and clip > 0; noise >= 0")


def directional_samples(
    direction: torch.Tensor, count: int, epsilon: float, noise: float, channels: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's linearly separable distribution along ``direction`` v (unit norm, on every channel):
    x = ε·y·v + ξ with y = ±1 and ξ Gaussian noise orthogonal to v. Returns images (count, C, S, S)
    and labels in {0, 1} (y = 2·label − 1)."""
    side = direction.shape[-1]
    v = direction.expand(channels, side, side).reshape(-1)
    v = v / v.norm()
    labels = torch.randint(0, 2, (count,), generator=generator)
    xi = noise * torch.randn(count, v.numel(), generator=generator)
    xi -= (xi @ v)[:, None] * v[None, :]
    images = epsilon * (2 * labels[:, None] - 1).float() * v[None, :] + xi
    return images.view(count, channels, side, side), labels


def separability(
    build: Callable[[torch.Generator], nn.Module],
    directions: dict[tuple[int, int], torch.Tensor],
    channels: int,
    seed: int,
    recipe: SeparabilityRecipe = SeparabilityRecipe(),
) -> dict[tuple[int, int], float]:
    """Test accuracy of a freshly initialised ``build(generator)`` (one logit) trained on a fixed
    sample of the separable distribution of each direction (``recipe``): the paper's test."""
    recipe.check()
    accuracies = {}
    for index, (key, direction) in enumerate(directions.items()):
        generator = torch.Generator().manual_seed(_init_seed(seed, index))
        model = build(generator).train()
        images, labels = directional_samples(direction, recipe.train_samples, recipe.epsilon, recipe.noise, channels, generator)
        optimiser = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=0.0)
        batches = -(-recipe.train_samples // recipe.batch)
        for epoch in range(recipe.epochs):
            order = torch.randperm(recipe.train_samples, generator=generator)
            for step, chosen in enumerate(order.split(recipe.batch)):
                progress = (epoch + (step + 1) / batches) / recipe.epochs
                optimiser.param_groups[0]["lr"] = recipe.lr * (1.0 - progress)  # linear to 0, per batch
                loss = nn.functional.binary_cross_entropy_with_logits(model(images[chosen]), labels[chosen].float())
                optimiser.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(model.parameters(), recipe.clip)
                optimiser.step()
        model.eval()
        test, test_labels = directional_samples(direction, recipe.test_samples, recipe.epsilon, recipe.noise, channels, generator)
        with torch.no_grad():
            logits = torch.cat([model(chunk) for chunk in test.split(1000)])
        accuracies[key] = float(((logits > 0).long() == test_labels).float().mean())
    return accuracies


def write_separability(network: dict[tuple[int, int], float], control: dict[tuple[int, int], float], out: Path) -> None:
    """``separability.csv`` (row and column frequency, network and linear-control accuracy) and
    ``separability.png``, the network's accuracy as a heat map over the two frequencies."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    with open(out / "separability.csv", "w") as handle:
        handle.write("row_frequency,column_frequency,accuracy,linear_control_accuracy\n")
        handle.writelines(f"{r},{c},{network[(r, c)]:.4f},{control[(r, c)]:.4f}\n" for r, c in sorted(network))
    rows, columns = sorted({r for r, _ in network}), sorted({c for _, c in network})
    grid = torch.tensor([[network[(r, c)] for c in columns] for r in rows])
    figure, axis = plt.subplots(figsize=(4.5, 4))
    image = axis.imshow(grid.numpy(), vmin=0.5, vmax=1.0, cmap="magma")
    axis.set_xticks(range(len(columns)), [str(c) for c in columns])
    axis.set_yticks(range(len(rows)), [str(r) for r in rows])
    axis.set_xlabel("column frequency (DCT)")
    axis.set_ylabel("row frequency (DCT)")
    figure.colorbar(image, label="test accuracy")
    figure.tight_layout()
    figure.savefig(out / "separability.png", dpi=120)
    plt.close(figure)

"""Exemplar-CNN surrogate classes (Dosovitskiy et al., NIPS 2014): labels made from unlabelled images.

Each surrogate class is one *seed* window of one training image; its samples are random
transformations of that window. The classes and every sample are a function of one seed: the
seed windows and the colour PCA are drawn from a generator seeded by ``seed``; sample ``j`` of
class ``i`` is drawn from torch's default generator, forked and seeded from ``(seed, i, j)`` for
that one sample (``data.seeds.seeded``; torchvision's transforms take no generator, and the colour
modules below draw from the same stream after them), so the ``classes * samples_per_class``
dataset exists without being stored and a rerun sees the same images. The images come from :class:`UnlabelledImages`, which holds no labels at all: exemplar
training cannot read them.

Transformations (§2.1 of the paper, magnitudes as defaults in :class:`ExemplarTransforms`):
translation by up to 0.2 of the window size, scaling by 0.7-1.4, rotation by up to 20°, contrast
in PCA colour space (each principal component's projection times 0.5-2), saturation and value
raised to a power in 0.25-4, times 0.7-1.4, plus -0.1..0.1, and hue plus -0.1..0.1. Greyscale data
(no colour to transform) get elastic distortions instead, with Simard et al.'s (2003) handwriting
magnitudes (alpha 34, sigma 4 px at 28 px). Geometry and elastic distortions are torchvision v2
transforms; the colour transforms, which torchvision does not offer, are the small modules below.

Adaptation, stated: the paper cut 32-px windows from 96-px images for networks that read 32 px.
Few-shot backbones here read whole images, so a seed window covers ``seed_fraction`` (default
0.5-1.0) of the image side and is resized to the image size.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from matplotlib.colors import hsv_to_rgb, rgb_to_hsv
from torch import nn
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from fewshot_nsl.data.dataset import ImageClassSet, standardise
from fewshot_nsl.data.seeds import hashed_seed, seeded
from fewshot_nsl.errors import UserError

# Candidate windows drawn per seed; the one with the largest mean gradient magnitude is kept (the
# paper samples "only from regions containing considerable gradients").
SEED_CANDIDATES = 4
PCA_PIXELS = 100_000  # pixels of the seed windows the colour PCA is estimated from
ENERGY_CHUNK = 2048  # candidate windows scored at once (bounds the float copies of their images)


@dataclass(frozen=True)
class UnlabelledImages:
    """Images of a split and their normalisation, and nothing else: no labels, no class names."""

    images: torch.Tensor  # uint8 (N, C, H, W)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str


def unlabelled(split: ImageClassSet) -> UnlabelledImages:
    """The images of ``split`` without its labels (reads only images, mean, std and name)."""
    return UnlabelledImages(split.images, split.mean, split.std, f"{split.name} (labels dropped)")


@dataclass(frozen=True)
class ExemplarTransforms:
    """Magnitudes of the surrogate-class transformations; defaults: Dosovitskiy et al. (2014), §2.1."""

    translate: float = 0.2  # of the window size, each axis
    scale: tuple[float, float] = (0.7, 1.4)
    rotate: float = 20.0  # degrees, either way
    pca_contrast: tuple[float, float] = (0.5, 2.0)  # factor per principal component
    sv_power: tuple[float, float] = (0.25, 4.0)  # saturation and value raised to this power
    sv_factor: tuple[float, float] = (0.7, 1.4)
    sv_shift: tuple[float, float] = (-0.1, 0.1)
    hue_shift: float = 0.1
    elastic_alpha: float = 34.0  # greyscale only; Simard et al. (2003), at 28 px (scaled with the image)
    elastic_sigma: float = 4.0
    seed_fraction: tuple[float, float] = (0.5, 1.0)  # seed window side / image side (adaptation, see module doc)

    def __post_init__(self) -> None:
        for name in ("scale", "pca_contrast", "sv_power", "sv_factor", "sv_shift", "seed_fraction"):
            low, high = getattr(self, name)
            if low > high:
                raise UserError(f"exemplar_transforms.{name}: the range must be (low, high), got ({low}, {high})")
        if not 0 < self.seed_fraction[0] <= self.seed_fraction[1] <= 1:
            raise UserError(f"exemplar_transforms.seed_fraction must lie in (0, 1], got {self.seed_fraction}")
        if min(self.scale[0], self.pca_contrast[0], self.sv_power[0], self.sv_factor[0]) <= 0:
            raise UserError("exemplar_transforms: scale, pca_contrast, sv_power and sv_factor must be positive")
        if self.translate < 0 or self.rotate < 0 or self.hue_shift < 0 or self.elastic_alpha < 0 or self.elastic_sigma <= 0:
            raise UserError("exemplar_transforms: translate, rotate, hue_shift, elastic_alpha must be >= 0, elastic_sigma > 0")

    @classmethod
    def from_mapping(cls, values: dict | None) -> "ExemplarTransforms":
        """From a run config's ``exemplar_transforms`` mapping (YAML); missing keys keep the paper's values."""
        values = dict(values or {})
        known = set(asdict(cls()))
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(f"exemplar_transforms: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        try:
            return cls(**{k: tuple(float(x) for x in v) if isinstance(v, (list, tuple)) else float(v) for k, v in values.items()})
        except (TypeError, ValueError) as error:
            raise UserError(f"exemplar_transforms: {error}") from None


@dataclass(frozen=True)
class SurrogateBatch:
    """Surrogate-labelled images (standardised floats) for one training step."""

    images: torch.Tensor
    labels: torch.Tensor

    def to(self, device: torch.device | str, memory_format: torch.memory_format = torch.contiguous_format) -> "SurrogateBatch":
        return SurrogateBatch(self.images.to(device, memory_format=memory_format), self.labels.to(device))


class PCAContrast(nn.Module):
    """Contrast 1: each pixel's projection on every principal colour component times its own factor.

    The factors come from the default generator, which ``SurrogateSampler.sample_image`` seeds for each
    sample (a generator of their own would change every committed exemplar sample: they are drawn after
    torchvision's, in one stream).
    """

    def __init__(self, components: torch.Tensor, mean: torch.Tensor, factors: tuple[float, float]):
        super().__init__()
        self.components, self.colour_mean, self.factors = components, mean, factors  # (3, 3) rows, (3,)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        low, high = self.factors
        factor = low * (high / low) ** torch.rand(3)  # log-uniform, so 0.5 and 2 are equally likely
        pixels = image.float().flatten(1).t() / 255 - self.colour_mean
        projected = pixels @ self.components.t() * factor
        out = (projected @ self.components + self.colour_mean).t().reshape(image.shape)
        return (out.clamp(0, 1) * 255).round().to(torch.uint8)


class HSVContrast(nn.Module):
    """Contrast 2 and colour: S and V to a power, times a factor, plus a shift; hue plus a shift.

    Draws from the default generator, seeded per sample, as ``PCAContrast`` does.
    """

    def __init__(self, transforms: ExemplarTransforms):
        super().__init__()
        self.t = transforms

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        t = self.t
        draws = torch.rand(7).tolist()
        hsv = rgb_to_hsv(image.permute(1, 2, 0).numpy().astype(np.float64) / 255)
        for channel, (u_power, u_factor, u_shift) in zip((1, 2), (draws[0:3], draws[3:6])):
            power = t.sv_power[0] * (t.sv_power[1] / t.sv_power[0]) ** u_power
            factor = t.sv_factor[0] + (t.sv_factor[1] - t.sv_factor[0]) * u_factor
            shift = t.sv_shift[0] + (t.sv_shift[1] - t.sv_shift[0]) * u_shift
            hsv[..., channel] = np.clip(hsv[..., channel] ** power * factor + shift, 0, 1)
        hsv[..., 0] = (hsv[..., 0] + t.hue_shift * (2 * draws[6] - 1)) % 1.0
        rgb = hsv_to_rgb(hsv)
        return torch.from_numpy(np.round(rgb * 255).astype(np.uint8)).permute(2, 0, 1).contiguous()


class SurrogateSampler:
    """Batches of surrogate-class samples from a fixed surrogate dataset.

    ``dataset_seed`` fixes the dataset: the seed windows and every sample's transformation (the
    same on every rank of a torchrun job). ``generator`` (named, per rank) draws each batch's
    ``(class, sample)`` pairs, uniformly among ``classes * samples_per_class``.
    """

    def __init__(
        self,
        images: UnlabelledImages,
        classes: int,
        samples_per_class: int,
        batch_size: int,
        transforms: ExemplarTransforms,
        dataset_seed: int,
        generator: torch.Generator,
    ):
        if classes < 2 or samples_per_class < 1 or batch_size < 1:
            raise UserError(
                f"exemplar training needs --surrogate-classes >= 2, --samples-per-class >= 1 and a batch >= 1; "
                f"got {classes}, {samples_per_class}, {batch_size}"
            )
        self.images, self.classes, self.samples_per_class = images, classes, samples_per_class
        self.batch_size, self.transforms, self.generator = batch_size, transforms, generator
        self.size = images.images.shape[-1]
        self.dataset_seed = dataset_seed
        construction = torch.Generator().manual_seed(dataset_seed)
        self.seeds = self._seed_windows(construction)  # (classes, 4): image index, top, left, side
        self._colour = self._colour_transforms(construction) if images.images.shape[1] == 3 else []
        self._elastic = (
            [v2.ElasticTransform(alpha=transforms.elastic_alpha * self.size / 28, sigma=transforms.elastic_sigma * self.size / 28)]
            if images.images.shape[1] == 1 and transforms.elastic_alpha > 0
            else []
        )

    def _seed_windows(self, generator: torch.Generator) -> torch.Tensor:
        images = self.images.images
        count, size = self.classes * SEED_CANDIDATES, self.size
        low, high = self.transforms.seed_fraction
        index = torch.randint(0, images.shape[0], (count,), generator=generator)
        side = (size * (low + (high - low) * torch.rand(count, generator=generator))).round().clamp(2, size).long()
        top = (torch.rand(count, generator=generator) * (size - side + 1)).long()
        left = (torch.rand(count, generator=generator) * (size - side + 1)).long()
        energy = torch.cat([
            _gradient_energy(images[index[part]], top[part], left[part], side[part])
            for part in torch.arange(count).split(ENERGY_CHUNK)
        ]).view(self.classes, SEED_CANDIDATES)  # fmt: skip
        best = energy.argmax(1) + torch.arange(self.classes) * SEED_CANDIDATES
        return torch.stack([index[best], top[best], left[best], side[best]], dim=1)

    def _colour_transforms(self, generator: torch.Generator) -> list[nn.Module]:
        windows = [self._window(c) for c in range(min(self.classes, 256))]
        pixels = torch.cat([w.float().flatten(1).t() / 255 for w in windows])
        pixels = pixels[torch.randperm(pixels.shape[0], generator=generator)[:PCA_PIXELS]]
        mean = pixels.mean(0)
        _, components = torch.linalg.eigh(torch.cov((pixels - mean).t()))
        return [PCAContrast(components.t().contiguous(), mean, self.transforms.pca_contrast), HSVContrast(self.transforms)]

    def _window(self, surrogate_class: int) -> torch.Tensor:
        index, top, left, side = self.seeds[surrogate_class].tolist()
        return self.images.images[index, :, top : top + side, left : left + side]

    def sample_image(self, surrogate_class: int, sample: int) -> torch.Tensor:
        """Sample ``sample`` of class ``surrogate_class``: uint8 (C, S, S), the same on every call."""
        index, top, left, side = self.seeds[surrogate_class].tolist()
        t = self.transforms
        # A context of twice the window around it, edge-padded, so the geometric transformations
        # move real image content into the window instead of fill.
        image = TF.pad(self.images.images[index], [side], padding_mode="edge")
        context = TF.crop(image, top + side - side // 2, left + side - side // 2, 2 * side, 2 * side)
        geometric = v2.RandomAffine(degrees=t.rotate, translate=(t.translate / 2, t.translate / 2), scale=t.scale)
        steps: list[nn.Module] = [geometric, v2.CenterCrop(side), v2.Resize(self.size, antialias=True), *self._elastic, *self._colour]
        # torchvision's transforms take no generator: the sample's stream is the default one, seeded for it.
        with seeded(hashed_seed("exemplar", self.dataset_seed, surrogate_class, sample)):
            return v2.Compose(steps)(context)

    def sample(self) -> SurrogateBatch:
        picks = torch.randint(0, self.classes * self.samples_per_class, (self.batch_size,), generator=self.generator)
        classes, samples = picks // self.samples_per_class, picks % self.samples_per_class
        raw = torch.stack([self.sample_image(int(c), int(s)) for c, s in zip(classes, samples)])
        return SurrogateBatch(standardise(raw, self.images.mean, self.images.std), classes)


def _gradient_energy(images: torch.Tensor, top: torch.Tensor, left: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
    """Mean absolute finite-difference gradient of each image (grey) inside its window, from an integral image."""
    gray = images.float().mean(1)
    gradient = (gray[:, 1:, :-1] - gray[:, :-1, :-1]).abs() + (gray[:, :-1, 1:] - gray[:, :-1, :-1]).abs()
    integral = torch.nn.functional.pad(gradient.cumsum(1).cumsum(2), (1, 0, 1, 0))
    last = gradient.shape[-1]
    bottom, right = (top + side - 1).clamp(max=last), (left + side - 1).clamp(max=last)
    rows = torch.arange(images.shape[0])
    sums = integral[rows, bottom, right] - integral[rows, top, right] - integral[rows, bottom, left] + integral[rows, top, left]
    return sums / (bottom - top).clamp(min=1).float() / (right - left).clamp(min=1).float()


"""Training augmentation: torchvision v2 transforms driven by a named generator, never the global one."""

from __future__ import annotations

import pytest
import torch

from fewshot_nsl.config import RunConfig
from fewshot_nsl.data.augment import Augmentation
from fewshot_nsl.data.dataset import ImageClassSet
from fewshot_nsl.episodes.sampler import EpisodeSampler
from fewshot_nsl.errors import UserError
from fewshot_nsl.learners import recipe_columns, recipe_hash


def images(n: int = 40, channels: int = 3, size: int = 12) -> torch.Tensor:
    return torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))


def test_the_named_generator_alone_decides_and_the_global_state_is_untouched() -> None:
    batch, augmentation = images(), Augmentation()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = augmentation(batch, torch.Generator().manual_seed(7))
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(999)  # another global state changes nothing
    assert torch.equal(augmentation(batch, torch.Generator().manual_seed(7)), first)
    assert not torch.equal(augmentation(batch, torch.Generator().manual_seed(8)), first)
    assert first.shape == batch.shape and first.dtype == torch.uint8


@pytest.mark.parametrize("channels", [1, 3])
def test_with_full_crops_and_no_jitter_each_image_is_kept_or_mirrored(channels: int) -> None:
    batch = images(200, channels)
    out = Augmentation(crop_scale=1.0, jitter=0.0, flip=True)(batch, torch.Generator().manual_seed(0))
    kept = (out == batch).flatten(1).all(1)
    mirrored = (out == batch.flip(-1)).flatten(1).all(1)
    assert (kept | mirrored).all()
    assert 70 < int(mirrored.sum()) < 130  # p = 0.5 each; 200 images: within about 4 standard deviations


def test_crops_and_jitter_change_images_per_image() -> None:
    batch = images(20)
    out = Augmentation()(batch, torch.Generator().manual_seed(0))
    changed = (out != batch).flatten(1).any(1)
    assert changed.all()
    assert len({tuple(o.flatten()[:8].tolist()) for o in out}) == 20  # no two images share their draws


def test_augmented_sampling_keeps_the_episodes_and_only_changes_pixels() -> None:
    labels = torch.arange(6).repeat_interleave(8)
    data = ImageClassSet(images(48), labels, tuple("abcdef"), (0.5,) * 3, (0.5,) * 3, "toy")
    plain = EpisodeSampler(data, 3, 2, 2, torch.Generator().manual_seed(1))
    augmented = EpisodeSampler(data, 3, 2, 2, torch.Generator().manual_seed(1), Augmentation(), torch.Generator().manual_seed(2))
    for _ in range(3):
        a, b = plain.sample_indices(), augmented.sample_indices()
        assert torch.equal(a.classes, b.classes) and torch.equal(a.support, b.support)
    episode, reference = augmented.sample(), plain.sample()
    assert torch.equal(episode.support_labels, reference.support_labels)
    assert not torch.equal(episode.support_images, reference.support_images)
    with pytest.raises(ValueError, match="its own torch.Generator"):
        EpisodeSampler(data, 3, 2, 2, torch.Generator(), Augmentation())


def test_rows_tell_augmented_recipes_apart_and_bad_settings_are_refused() -> None:
    plain = RunConfig(dataset="miniimagenet").resolve()
    augmented = plain.updated({"augment": True})
    assert recipe_columns(plain)["augmentation"] == "none"
    assert recipe_columns(augmented)["augmentation"] == "rrc0.08-flip-jitter0.4"
    assert "aug:rrc0.08-flip-jitter0.4" in recipe_columns(augmented)["recipe"]
    assert len({recipe_hash(plain), recipe_hash(augmented), recipe_hash(augmented.updated({"augment_jitter": 0.2}))}) == 3
    # settings of an augmentation that is off do not change the recipe
    assert recipe_hash(plain.updated({"augment_jitter": 0.2})) == recipe_hash(plain)
    # fields added later leave the hashes recorded before them unchanged (values computed before the change)
    assert recipe_hash(RunConfig(device="cpu").resolve()) == "059f3b6a4f95"  # cpu: CUDA would switch on vmap
    legacy_maml = RunConfig(
        method="maml", ways=5, shots=1, conv4_downsample="maxpool", head_init="uniform", device="cpu"
    ).resolve()
    assert recipe_hash(legacy_maml) == "901d34c929c9"  # MAML as trained before Finn's Omniglot network was the default
    assert recipe_hash(RunConfig(method="maml", ways=5, shots=1).resolve()) != "901d34c929c9"
    with pytest.raises(UserError, match="augment_crop_scale"):
        plain.updated({"augment": True, "augment_crop_scale": 0.0}).resolve()  # refused before any run starts
    with pytest.raises(UserError, match="augment_jitter"):
        Augmentation(jitter=1.5)

"""Generic ``<root>/<split>/<class>/<image>`` reader on tiny fixture folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fewshot_nsl.data.image_folder import load_image_folder
from fewshot_nsl.data.registry import load_split
from fewshot_nsl.errors import UserError
from tests.cache_helpers import undecodable_keeping_stat


def _save(path: Path, array: np.ndarray, mode: str | None = None, fmt: str | None = None) -> None:
    """Save ``array`` (mode as Pillow infers it from shape and dtype; ``mode`` only documents it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array)
    assert mode is None or image.mode == mode, (image.mode, mode)
    image.save(path, fmt)


def _rgb(color, size=(16, 16)) -> np.ndarray:
    return np.broadcast_to(np.array(color, dtype=np.uint8), (*size, 3)).copy()


@pytest.fixture
def mixed_folder(tmp_path: Path) -> Path:
    """train/{cat,dog,emu} with png, jpg, jpeg, bmp, webp; RGB, RGBA, gray, palette; several sizes."""
    root = tmp_path / "pets"
    rng = np.random.default_rng(0)
    exact = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    _save(root / "train" / "cat" / "a_exact.png", exact)  # already 16x16: kept bit for bit
    _save(root / "train" / "cat" / "b_gray.png", np.full((20, 20), 77, np.uint8), mode="L")
    _save(root / "train" / "cat" / "c_photo.JPG", _rgb((200, 10, 10), (30, 40)))
    _save(root / "train" / "dog" / "a.bmp", _rgb((10, 200, 10)), fmt="BMP")
    _save(root / "train" / "dog" / "b.webp", _rgb((10, 10, 200)), fmt="WEBP")
    rgba = np.dstack([_rgb((50, 60, 70)), np.full((16, 16), 128, np.uint8)])
    _save(root / "train" / "dog" / "c_alpha.png", rgba, mode="RGBA")
    palette = Image.fromarray(_rgb((250, 120, 0))).convert("P", palette=Image.ADAPTIVE, colors=4)
    (root / "train" / "emu").mkdir(parents=True)
    palette.save(root / "train" / "emu" / "a_palette.png")
    _save(root / "train" / "emu" / "b.jpeg", _rgb((90, 90, 90), (24, 24)))
    (root / "train" / "emu" / "notes.txt").write_text("not an image")
    (root / "train" / "emu" / ".DS_Store").write_bytes(b"\0")
    _save(root / "test" / "cat" / "x.png", exact)
    return root


def test_mixed_folder(mixed_folder, cache_dir):
    data = load_image_folder(mixed_folder, "train", cache_dir, image_size=16)
    assert data.class_names == ("cat", "dog", "emu")
    assert data.class_sizes().tolist() == [3, 3, 2]
    assert data.images.shape == (8, 3, 16, 16) and data.images.dtype == torch.uint8
    assert data.mean == (0.5, 0.5, 0.5) and data.std == (0.5, 0.5, 0.5)
    assert data.name == "folder/pets/train"
    exact = np.array(Image.open(mixed_folder / "train" / "cat" / "a_exact.png"))
    assert torch.equal(data.images[0], torch.from_numpy(exact).permute(2, 0, 1))
    expected_centres = [
        None,
        (77, 77, 77),  # gray repeated to 3 channels
        (200, 10, 10),
        (10, 200, 10),  # BMP through the PIL fallback
        (10, 10, 200),
        (50, 60, 70),  # alpha dropped
        (250, 120, 0),  # palette PNG read as colour
        (90, 90, 90),
    ]
    for index, colour in enumerate(expected_centres):
        if colour is not None:
            centre = data.images[index, :, 8, 8].int()
            assert (centre - torch.tensor(colour)).abs().max() <= 4, (index, centre.tolist(), colour)


def test_all_gray_gives_one_channel(tmp_path, cache_dir):
    root = tmp_path / "gray"
    _save(root / "val" / "a" / "1.png", np.full((10, 10), 30, np.uint8), mode="L")
    _save(root / "val" / "a" / "2.jpg", np.full((12, 12), 60, np.uint8), mode="L")
    (root / "val" / "b").mkdir(parents=True)
    gray = Image.fromarray(np.full((10, 10), 90, np.uint8))
    Image.merge("LA", [gray, gray.point(lambda _: 255)]).save(root / "val" / "b" / "1.png")
    _save(root / "val" / "b" / "2.png", (np.arange(100).reshape(10, 10) * 600).astype(np.uint16), mode="I;16")  # 16-bit gray PNG
    data = load_image_folder(root, "val", cache_dir, image_size=10)
    assert data.images.shape == (4, 1, 10, 10)
    assert data.mean == (0.5,) and data.std == (0.5,)
    assert data.images[0].eq(30).all() and data.images[2].eq(90).all()
    sixteen = (torch.arange(100).reshape(10, 10) * 600) >> 8
    assert torch.equal(data.images[3, 0].int(), sixteen.int())  # 16 bit scaled to 8


def test_shorter_side_then_centre_crop(tmp_path, cache_dir):
    """A 32x64 image: red | green | green | blue quarters → 16x32 → the centre 16x16 is the green half."""
    picture = np.zeros((32, 64, 3), np.uint8)
    picture[:, :16] = (255, 0, 0)
    picture[:, 16:48] = (0, 255, 0)
    picture[:, 48:] = (0, 0, 255)
    _save(tmp_path / "wide" / "train" / "only" / "wide.png", picture)
    image = load_image_folder(tmp_path / "wide", "train", cache_dir, image_size=16).images[0]
    assert image.shape == (3, 16, 16)
    interior = image[:, :, 1:15].int()
    assert interior[1].min() >= 200 and interior[0].max() <= 40 and interior[2].max() <= 40


def test_cached(mixed_folder, cache_dir):
    first = load_image_folder(mixed_folder, "train", cache_dir, image_size=16)
    assert len(list(cache_dir.glob("folder-pets-train-16-*.pt"))) == 1
    images = [p for p in (mixed_folder / "train").rglob("*") if p.is_file() and not p.name.startswith(".")]
    with undecodable_keeping_stat(images):
        again = load_image_folder(mixed_folder, "train", cache_dir, image_size=16)  # a decode would fail
    assert torch.equal(again.images, first.images) and again.fingerprint() == first.fingerprint()


def test_registry_reads_a_folder_path(mixed_folder, cache_dir):
    data = load_split(str(mixed_folder), "test", image_size=16)
    assert data.class_names == ("cat",) and data.images.shape == (1, 3, 16, 16)
    assert list(cache_dir.glob("folder-pets-test-16-*.pt"))  # FEWSHOT_NSL_CACHE was used


def test_clear_errors(mixed_folder, tmp_path, cache_dir):
    with pytest.raises(UserError, match=r"no 'val' split .* it has 'test', 'train'"):
        load_image_folder(mixed_folder, "val", cache_dir, 16)
    with pytest.raises(UserError, match="does not exist"):
        load_image_folder(tmp_path / "nowhere", "train", cache_dir, 16)

    empty = mixed_folder / "train" / "fox"
    empty.mkdir()
    (empty / "readme.md").write_text("no images here")
    with pytest.raises(UserError, match=r"class folder .*fox has no images"):
        load_image_folder(mixed_folder, "train", cache_dir, 16)
    empty.joinpath("readme.md").unlink()
    empty.rmdir()

    broken = mixed_folder / "train" / "dog" / "d_broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(UserError, match="d_broken.jpg"):
        load_image_folder(mixed_folder, "train", cache_dir, 16)
    broken.write_bytes(b"")
    with pytest.raises(UserError, match="d_broken.jpg"):
        load_image_folder(mixed_folder, "train", cache_dir, 16)

    loose = tmp_path / "loose"
    _save(loose / "train" / "1.png", _rgb((1, 2, 3)))
    with pytest.raises(UserError, match="no class folders .*1 images lie directly in it"):
        load_image_folder(loose, "train", cache_dir, 16)

"""Mini-ImageNet reader: both on-disk layouts on tiny fixture trees, and the real test split."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision.io import decode_jpeg, read_file

from fewshot_nsl.data.miniimagenet import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    describe_miniimagenet,
    list_split,
    load_miniimagenet,
    prepare_miniimagenet,
)
from fewshot_nsl.errors import UserError
from tests.cache_helpers import undecodable_keeping_stat

WNIDS = ("n03000001", "n01000002", "n02000003")  # listed unsorted on purpose
PER_CLASS = 4


def _color(class_index: int, image_index: int) -> tuple[int, int, int]:
    return (40 + 60 * class_index, 30 + 50 * image_index, 200 - 40 * class_index)


def _jpeg(path: Path, color, size=(84, 84), mode="RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size, color)
    (image.convert("L") if mode == "L" else image).save(path, "JPEG", quality=95)


def _file_name(wnid: str, index: int) -> str:
    return f"{wnid}{index + 1:08d}.jpg"


def build_folders(folder: Path, split: str = "test") -> None:
    """``<folder>/<split>/<wnid>/<file>.jpg``, one flat colour per image."""
    for c, wnid in enumerate(WNIDS):
        for i in range(PER_CLASS):
            _jpeg(folder / split / wnid / _file_name(wnid, i), _color(c, i))


def build_csv_layout(folder: Path, split: str = "test", csv_path: Path | None = None) -> None:
    """``<folder>/images/`` plus ``splits/ravi/<split>.csv`` (rows in csv order, not sorted)."""
    rows = []
    for c, wnid in enumerate(WNIDS):
        for i in reversed(range(PER_CLASS)):
            _jpeg(folder / "images" / _file_name(wnid, i), _color(c, i))
            rows.append((_file_name(wnid, i), wnid))
    csv_path = csv_path or folder / "splits" / "ravi" / f"{split}.csv"
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with open(csv_path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["filename", "label"])
        writer.writerows(rows)


def _check_fixture_content(data) -> None:
    assert data.class_names == tuple(sorted(WNIDS))
    assert data.images.dtype == torch.uint8 and data.images.shape == (len(WNIDS) * PER_CLASS, 3, 84, 84)
    assert data.class_sizes().tolist() == [PER_CLASS] * len(WNIDS)
    assert data.mean == IMAGENET_MEAN and data.std == IMAGENET_STD
    for label, wnid in enumerate(data.class_names):
        c = WNIDS.index(wnid)
        members = data.members(label)
        for i, index in enumerate(members.tolist()):
            centre = data.images[index, :, 42, 42].int()
            assert (centre - torch.tensor(_color(c, i))).abs().max() <= 3, (wnid, i)


@pytest.mark.filterwarnings("ignore:.*decoding and encoding capabilities:DeprecationWarning")
def test_folder_layout(tmp_path, cache_dir):
    build_folders(tmp_path / "miniimagenet")
    data = load_miniimagenet(tmp_path, "test", cache_dir)
    _check_fixture_content(data)
    assert data.name == "miniimagenet/ravi/test"
    # exactly what torchvision decodes, in class then file-name order
    first = tmp_path / "miniimagenet" / "test" / sorted(WNIDS)[0] / _file_name(sorted(WNIDS)[0], 0)
    assert torch.equal(data.images[0], decode_jpeg(read_file(str(first))))


def test_csv_layout_gives_the_same_set(tmp_path, cache_dir):
    build_folders(tmp_path / "a" / "miniimagenet")
    build_csv_layout(tmp_path / "b" / "miniimagenet")
    from_folders = load_miniimagenet(tmp_path / "a", "test", cache_dir)
    from_csv = load_miniimagenet(tmp_path / "b", "test", cache_dir)
    _check_fixture_content(from_csv)
    assert from_csv.class_names == from_folders.class_names
    assert torch.equal(from_csv.images, from_folders.images)
    assert torch.equal(from_csv.labels, from_folders.labels)
    assert from_csv.fingerprint() == from_folders.fingerprint()


def test_csv_beside_images(tmp_path, cache_dir):
    folder = tmp_path / "miniimagenet"
    build_csv_layout(folder, csv_path=folder / "test.csv")
    _check_fixture_content(load_miniimagenet(tmp_path, "test", cache_dir))


def test_partial_split_other_sizes_and_gray(tmp_path, cache_dir):
    """Classes with fewer images are read as present; other sizes are resized; gray JPEGs become RGB."""
    folder = tmp_path / "miniimagenet"
    build_folders(folder, "train")
    wnid = WNIDS[0]
    (folder / "train" / wnid / _file_name(wnid, 3)).unlink()
    _jpeg(folder / "train" / wnid / _file_name(wnid, 1), (90, 90, 90), size=(120, 100), mode="L")
    data = load_miniimagenet(tmp_path, "train", cache_dir)
    label = data.class_names.index(wnid)
    assert data.class_sizes()[label] == PER_CLASS - 1
    resized_gray = data.images[data.members(label)[1]]
    assert resized_gray.shape == (3, 84, 84)
    assert (resized_gray.int() - 90).abs().max() <= 3
    summary = list_split(folder, "train").summary()
    assert "3 classes, 11 images (3-4 per class; the full split has 600)" in summary


def test_cache_is_used_and_invalidated(tmp_path, cache_dir):
    build_folders(tmp_path / "miniimagenet")
    first = load_miniimagenet(tmp_path, "test", cache_dir)
    assert len(list(cache_dir.glob("miniimagenet-test-84-*.pt"))) == 1

    with undecodable_keeping_stat((tmp_path / "miniimagenet" / "test").rglob("*.jpg")):
        again = load_miniimagenet(tmp_path, "test", cache_dir)  # a decode would fail: this is the cache
    assert torch.equal(again.images, first.images)

    changed = tmp_path / "miniimagenet" / "test" / WNIDS[1] / _file_name(WNIDS[1], 2)
    _jpeg(changed, (0, 0, 0))
    os.utime(changed, ns=(0, 10**9))
    rebuilt = load_miniimagenet(tmp_path, "test", cache_dir)
    assert not torch.equal(rebuilt.images, first.images)

    small = load_miniimagenet(tmp_path, "test", cache_dir, image_size=32)
    assert small.images.shape[-2:] == (32, 32)


def test_clear_errors(tmp_path, cache_dir):
    with pytest.raises(UserError, match=r"Run `fewshot-nsl data prepare miniimagenet` \(downloads the pickle caches\)"):
        load_miniimagenet(tmp_path, "test", cache_dir)
    with pytest.raises(UserError, match="no 'dev' split"):
        load_miniimagenet(tmp_path, "dev", cache_dir)

    folder = tmp_path / "miniimagenet"
    build_csv_layout(folder)
    (folder / "images" / _file_name(WNIDS[2], 1)).unlink()
    with pytest.raises(UserError, match=r"1 of the images listed in .*test\.csv are missing"):
        load_miniimagenet(tmp_path, "test", cache_dir)

    build_folders(tmp_path / "broken" / "miniimagenet")
    bad = tmp_path / "broken" / "miniimagenet" / "test" / WNIDS[0] / _file_name(WNIDS[0], 2)
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    with pytest.raises(UserError, match=bad.name):
        load_miniimagenet(tmp_path / "broken", "test", cache_dir)

    empty = tmp_path / "empty" / "miniimagenet" / "val" / "n09999999"
    empty.mkdir(parents=True)
    with pytest.raises(UserError, match="n09999999 has no .jpg images"):
        load_miniimagenet(tmp_path / "empty", "val", cache_dir)


def _ravi_like_copy(folder: Path) -> None:
    """Folders layout with the Ravi class counts (64/16/20), one tiny image per class."""
    counts = {"train": 64, "val": 16, "test": 20}
    number = 0
    for split, count in counts.items():
        for _ in range(count):
            number += 1
            wnid = f"n{number:08d}"
            _jpeg(folder / split / wnid / f"{wnid}00000001.jpg", (number, 0, 0), size=(8, 8))


def test_prepare_links_a_valid_copy(tmp_path):
    source = tmp_path / "my-copy"
    _ravi_like_copy(source)
    data_root = tmp_path / "data"
    target = prepare_miniimagenet(source, data_root)
    assert target == data_root / "miniimagenet" and target.is_symlink()
    assert target.resolve() == source.resolve()
    assert prepare_miniimagenet(source, data_root) == target  # idempotent
    listings = describe_miniimagenet(target)
    assert {s: len(l.class_names) for s, l in listings.items()} == {"train": 64, "val": 16, "test": 20}
    assert load_miniimagenet(data_root, "val", tmp_path / "cache", image_size=8).num_classes == 16

    other = tmp_path / "other-copy"
    _ravi_like_copy(other)
    with pytest.raises(UserError, match="already exists"):
        prepare_miniimagenet(other, data_root)


def test_prepare_refuses_wrong_copies(tmp_path):
    with pytest.raises(UserError, match="is not a folder"):
        prepare_miniimagenet(tmp_path / "nowhere", tmp_path / "data")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(UserError, match="no Mini-ImageNet split found"):
        prepare_miniimagenet(tmp_path / "nothing", tmp_path / "data")
    build_folders(tmp_path / "few", "test")
    with pytest.raises(UserError, match="has 3 classes; the Ravi test split has 20"):
        prepare_miniimagenet(tmp_path / "few", tmp_path / "data")
    assert not (tmp_path / "data" / "miniimagenet").exists()


# ---------------------------------------------------------------- the real data


@pytest.mark.real_data
@pytest.mark.filterwarnings("ignore:.*decoding and encoding capabilities:DeprecationWarning")
def test_real_test_split(real_miniimagenet_root, real_cache_dir):
    # Whether a load reads the cache instead of decoding is tested on fixtures
    # (test_cache_is_used_and_invalidated); here: the real split, loaded twice, is the same.
    data = load_miniimagenet(real_miniimagenet_root, "test", real_cache_dir)
    again = load_miniimagenet(real_miniimagenet_root, "test", real_cache_dir)
    assert list(real_cache_dir.glob("miniimagenet-test-84-*.pt")), "the decoded split was not cached"

    assert data.num_classes == 20 and data.images.shape == (12000, 3, 84, 84)
    assert data.images.dtype == torch.uint8
    assert data.class_sizes().eq(600).all()
    with open(real_miniimagenet_root / "miniimagenet" / "splits" / "ravi" / "test.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert data.class_names == tuple(sorted({r["label"] for r in rows}))
    assert torch.equal(again.images, data.images) and again.fingerprint() == data.fingerprint()
    # the first image of the first class is the first csv file of that wnid
    wnid = data.class_names[0]
    name = sorted(r["filename"] for r in rows if r["label"] == wnid)[0]
    path = real_miniimagenet_root / "miniimagenet" / "test" / wnid / name
    assert torch.equal(data.images[data.members(0)[0]], decode_jpeg(read_file(str(path))))


@pytest.mark.real_data
def test_real_layout_description(real_miniimagenet_root):
    listings = describe_miniimagenet(real_miniimagenet_root / "miniimagenet")
    counts = {split: (len(l.class_names), sorted({len(f) for f in l.files})) for split, l in listings.items()}
    assert counts == {"train": (64, [300]), "val": (16, [600]), "test": (20, [600])}
    assert "the full split has 600" in listings["train"].summary()

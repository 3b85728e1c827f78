"""Property tests (hypothesis) of the data readers over generated datasets on disk.

Valid inputs: whatever the class names, image counts, sizes, colour modes and
file formats, a reader returns every image exactly once, labelled by its
class in sorted order, with the pixels it was given; Mini-ImageNet's three
layouts (folders, flat images + csv, pickle cache) read the same pixels into
the same dataset. Broken inputs (random bytes, truncated files, corrupted
archives and tables) raise the one documented ``UserError``, naming the file.
"""

from __future__ import annotations

import csv
import pickle
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from fewshot_nsl.data.image_folder import load_image_folder
from fewshot_nsl.data.miniimagenet import load_miniimagenet, pickle_cache_path
from fewshot_nsl.data.omniglot import DRAWERS, SETS, load_omniglot
from fewshot_nsl.errors import UserError

# Files are written per example, so fewer examples than the sampler's properties.
READER_SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)
CLASS_NAMES = st.text(alphabet="abcXYZ019_-", min_size=1, max_size=6)
# Largest per-channel error a format may add to a uniform colour (lossless formats: rounding only).
TOLERANCE = {"png": 1, "bmp": 1, "jpg": 6}
SIZE = 8


@contextmanager
def scratch() -> Iterator[Path]:
    """A fresh folder per hypothesis example (function-scoped fixtures are shared across examples)."""
    with tempfile.TemporaryDirectory() as folder:
        yield Path(folder)


# ----------------------------------------------------------------- image folders

image_specs = st.tuples(
    st.tuples(*[st.integers(0, 255)] * 3),  # colour
    st.integers(1, 20),  # height
    st.integers(1, 20),  # width
    st.sampled_from(["L", "RGB", "RGBA", "P"]),
    st.sampled_from(sorted(TOLERANCE)),
)


def write_uniform(path: Path, colour: tuple[int, int, int], height: int, width: int, mode: str) -> tuple[int, ...]:
    """A one-colour image in ``mode``; returns the colour a reader should see (gray for L)."""
    rgb = Image.new("RGB", (width, height), colour)
    if mode == "L":
        image = rgb.convert("L")
        expected: tuple[int, ...] = (image.getpixel((0, 0)),) * 3
    elif mode == "P":
        image = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=2)
        expected = tuple(image.convert("RGB").getpixel((0, 0)))
    elif mode == "RGBA":
        image = rgb.convert("RGBA")
        image.putalpha(100)
        expected = colour
    else:
        image, expected = rgb, colour
    if path.suffix == ".jpg" and mode in ("RGBA", "P"):  # JPEG holds neither; store the colour as RGB
        image = image.convert("RGB")
    image.save(path)
    return expected


@READER_SETTINGS
@given(st.dictionaries(CLASS_NAMES, st.lists(image_specs, min_size=1, max_size=3), min_size=1, max_size=4))
def test_an_image_folder_reads_every_image_once_labelled_and_coloured_as_written(tree) -> None:
    with scratch() as tmp:
        expected: list[tuple[int, tuple[int, ...], int]] = []  # (label, colour, tolerance) in reading order
        modes = {spec[3] for specs in tree.values() for spec in specs}
        for label, name in enumerate(sorted(tree)):
            folder = tmp / "data" / "train" / name
            folder.mkdir(parents=True)
            for index, (colour, height, width, mode, fmt) in enumerate(tree[name]):
                seen = write_uniform(folder / f"{index:02d}.{fmt}", colour, height, width, mode)
                expected.append((label, seen, TOLERANCE[fmt]))
        data = load_image_folder(tmp / "data", "train", tmp / "cache", SIZE)
        again = load_image_folder(tmp / "data", "train", tmp / "cache", SIZE)  # from the cache

    assert data.class_names == tuple(sorted(tree))
    assert data.labels.tolist() == [label for label, _, _ in expected]
    gray = modes == {"L"}  # one channel only when every image is grayscale; colour images make it three
    assert data.images.shape == (len(expected), 1 if gray else 3, SIZE, SIZE)
    for image, (_, colour, tolerance) in zip(data.images, expected):
        want = torch.tensor(colour[:1] if gray else colour).view(-1, 1, 1)
        assert (image.int() - want).abs().max() <= tolerance
    assert torch.equal(again.images, data.images) and torch.equal(again.labels, data.labels)


# ----------------------------------------------------------------- Mini-ImageNet layouts


@st.composite
def mini_splits(draw) -> dict[str, np.ndarray]:
    """class name -> uint8 (n, S, S, 3) random images."""
    names = draw(st.lists(st.text(alphabet="n0123456789", min_size=2, max_size=9), min_size=1, max_size=4, unique=True))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    return {name: rng.integers(0, 256, (draw(st.integers(1, 3)), SIZE, SIZE, 3), dtype=np.uint8) for name in names}


def write_folders(root: Path, split: str, classes: dict[str, np.ndarray]) -> None:
    for name, images in classes.items():
        (root / split / name).mkdir(parents=True)
        for index, image in enumerate(images):
            Image.fromarray(image).save(root / split / name / f"{name}{index:04d}.png")


def write_csv(root: Path, split: str, classes: dict[str, np.ndarray]) -> None:
    (root / "images").mkdir(parents=True)
    rows = []
    for name, images in classes.items():
        for index, image in enumerate(images):
            file = f"{name}{index:04d}.png"
            Image.fromarray(image).save(root / "images" / file)
            rows.append((file, name))
    with open(root / f"{split}.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([("filename", "label"), *reversed(rows)])  # order must not matter


def write_pickle(root: Path, split: str, classes: dict[str, np.ndarray]) -> None:
    root.mkdir(parents=True)
    names = list(classes)[::-1]  # stored out of order on purpose
    stacked = np.concatenate([classes[n] for n in names])
    starts = np.cumsum([0] + [len(classes[n]) for n in names])
    class_dict = {n: list(range(starts[i], starts[i + 1])) for i, n in enumerate(names)}
    with open(pickle_cache_path(root, split), "wb") as handle:
        pickle.dump({"image_data": stacked, "class_dict": class_dict}, handle, protocol=4)


@READER_SETTINGS
@given(mini_splits(), st.sampled_from(["train", "val", "test"]))
def test_the_three_miniimagenet_layouts_read_the_same_dataset(classes, split) -> None:
    names = sorted(classes)
    want_images = torch.from_numpy(np.concatenate([classes[n] for n in names])).permute(0, 3, 1, 2)
    want_labels = torch.arange(len(names)).repeat_interleave(torch.tensor([len(classes[n]) for n in names]))
    with scratch() as tmp:
        for layout, write in (("folders", write_folders), ("csv", write_csv), ("pickle", write_pickle)):
            write(tmp / layout / "miniimagenet", split, classes)
            data = load_miniimagenet(tmp / layout, split, tmp / "cache", image_size=SIZE)
            assert data.class_names == tuple(names), layout
            assert torch.equal(data.labels, want_labels), layout
            assert torch.equal(data.images, want_images), layout


# ----------------------------------------------------------------- Omniglot npz form


def write_omniglot(root: Path, paper: dict[str, np.ndarray], rotations: list[tuple[str, int, int]]) -> list[str]:
    """The prepared layout; ``rotations`` (set, row, quarter turns) become the Vinyals train split."""
    folder = root / "omniglot"
    (folder / "splits" / "vinyals").mkdir(parents=True)
    rows = [("char_id", "set", "row", "alphabet", "character")]
    for set_name in SETS:
        np.savez_compressed(folder / f"images_{set_name}.npz", images=paper[set_name])
        rows += [(len(rows), set_name, r, f"{set_name}_alpha", f"character{r:02d}") for r in range(len(paper[set_name]))]
    with open(folder / "characters.csv", "w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    lines = [f"{s}_alpha/character{r:02d}/rot{90 * q:03d}" for s, r, q in rotations]
    for split in ("train", "val", "test"):
        (folder / "splits" / "vinyals" / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return lines


@st.composite
def omniglot_sets(draw):
    side = draw(st.integers(3, 7))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    paper = {s: rng.random((draw(st.integers(1, 3)), DRAWERS, side, side)) < 0.7 for s in SETS}
    chosen = draw(
        st.lists(
            st.tuples(st.sampled_from(SETS), st.integers(0, 2), st.integers(0, 3)), min_size=1, max_size=5, unique=True
        )
    )
    rotations = [(s, r % len(paper[s]), q) for s, r, q in chosen]
    return paper, list(dict.fromkeys(rotations))


@READER_SETTINGS
@given(omniglot_sets())
def test_omniglot_reads_ink_as_255_rotated_per_the_split_file(data) -> None:
    paper, rotations = data
    side = paper[SETS[0]].shape[-1]
    with scratch() as tmp:
        names = write_omniglot(tmp, paper, rotations)
        lake = load_omniglot(tmp, "lake", "train", tmp / "cache", image_size=side)
        vinyals = load_omniglot(tmp, "vinyals", "train", tmp / "cache", image_size=side)
    ink = {s: torch.from_numpy(~paper[s]).to(torch.uint8) * 255 for s in SETS}
    assert torch.equal(lake.images.view(-1, DRAWERS, side, side), ink["background"])
    assert lake.class_names == tuple(f"background_alpha/character{r:02d}" for r in range(len(paper["background"])))
    assert vinyals.class_names == tuple(names)
    for label, (set_name, row, quarter) in enumerate(rotations):
        got = vinyals.images[vinyals.labels == label].view(DRAWERS, side, side)
        assert torch.equal(got, torch.rot90(ink[set_name][row], quarter, dims=(-2, -1)))


# ----------------------------------------------------------------- broken inputs


def expect_named_error(path: Path, load) -> None:
    with pytest.raises(UserError) as raised:
        load()
    assert str(path) in str(raised.value)


@READER_SETTINGS
@given(st.sampled_from(["png", "jpg", "bmp"]), st.data())
def test_a_truncated_or_garbage_image_is_named(fmt, data) -> None:
    with scratch() as tmp:
        folder = tmp / "data" / "train" / "only"
        folder.mkdir(parents=True)
        good = folder / f"a.{fmt}"
        write_uniform(good, (10, 200, 30), 12, 12, "RGB")
        bad = folder / f"b.{fmt}"
        if data.draw(st.booleans(), label="garbage"):
            bad.write_bytes(data.draw(st.binary(max_size=64), label="bytes"))
        else:
            whole = good.read_bytes()
            bad.write_bytes(whole[: data.draw(st.integers(0, len(whole) // 2), label="cut")])
        expect_named_error(bad, lambda: load_image_folder(tmp / "data", "train", tmp / "cache", SIZE))


@READER_SETTINGS
@given(st.data())
def test_a_corrupted_omniglot_archive_or_table_is_named(data) -> None:
    paper = {s: np.ones((2, DRAWERS, 4, 4), dtype=bool) for s in SETS}
    with scratch() as tmp:
        write_omniglot(tmp, paper, [("background", 0, 0)])
        folder = tmp / "omniglot"
        damage = data.draw(st.sampled_from(["truncate", "garbage", "dtype", "set", "row", "range"]), label="damage")
        if damage in ("truncate", "garbage", "dtype"):
            target = folder / f"images_{data.draw(st.sampled_from(SETS), label='set')}.npz"
            whole = target.read_bytes()
            if damage == "truncate":
                target.write_bytes(whole[: data.draw(st.integers(0, len(whole) - 1), label="cut")])
            elif damage == "garbage":
                target.write_bytes(data.draw(st.binary(max_size=200), label="bytes"))
            else:
                np.savez(target.with_suffix(""), images=np.zeros((2, DRAWERS, 4, 4), np.float32))
        else:
            target = folder / "characters.csv"
            lines = target.read_text().splitlines()
            line = data.draw(st.integers(1, len(lines) - 1), label="line")
            fields = lines[line].split(",")
            if damage == "set":
                fields[1] = data.draw(st.sampled_from(["", "images_background", "Background"]), label="value")
            elif damage == "row":
                fields[2] = data.draw(st.sampled_from(["", "-1", "1.5", "x"]), label="value")
            else:
                fields[2] = str(data.draw(st.integers(2, 10**6), label="value"))
            lines[line] = ",".join(fields)
            target.write_text("\n".join(lines) + "\n")
        expect_named_error(target, lambda: load_omniglot(tmp, "lake", "train", tmp / "cache", image_size=4))

"""Omniglot: PNG tree → npz form, download path (offline, faked), and the reader on the real data."""

from __future__ import annotations

import csv
import io
import shutil
import urllib.error
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fewshot_nsl.data.omniglot import load_omniglot
from fewshot_nsl.data.omniglot_prepare import (
    SPLIT_NAMES,
    SPLITS_URL,
    CharacterRow,
    OmniglotSources,
    atomic_write,
    fetch_split,
    has_npz_form,
    prepare_omniglot,
    read_png_tree,
    scan_png_tree,
)
from fewshot_nsl.errors import UserError

# Character ids deliberately not in alphabetical order of the alphabets, as in
# the original data (the row order must follow the ids, not the folder names).
TREE = {
    "background": [("Zulu_(test)", 3), ("Alpha", 2)],
    "evaluation": [("Gamma", 2), ("Beta", 2)],
}


def _write_png(path: Path, paper: np.ndarray, one_bit: bool) -> None:
    if one_bit:
        Image.fromarray(paper).convert("1").save(path)  # 1-bit, like the original files
    else:
        Image.fromarray(paper.astype(np.uint8) * 255, mode="L").save(path)


def build_png_tree(png_root: Path, seed: int = 0) -> dict[str, tuple[np.ndarray, list[CharacterRow]]]:
    """Write a tiny ``images_<set>/<Alphabet>/<characterNN>/XXXX_YY.png`` tree; return what was drawn."""
    rng = np.random.default_rng(seed)
    drawn = {}
    char_id = 0
    for set_name, alphabets in TREE.items():
        images, rows = [], []
        for alphabet, count in alphabets:
            for number in range(1, count + 1):
                char_id += 1
                character = f"character{number:02d}"
                folder = png_root / f"images_{set_name}" / alphabet / character
                folder.mkdir(parents=True)
                paper = rng.random((20, 105, 105)) < 0.8
                for drawer in range(20):
                    _write_png(folder / f"{char_id:04d}_{drawer + 1:02d}.png", paper[drawer], one_bit=drawer % 2 == 0)
                images.append(paper)
                rows.append(CharacterRow(char_id, set_name, len(rows), alphabet, character))
        drawn[set_name] = (np.stack(images), rows)
    return drawn


def write_split_files(folder: Path, drawn) -> dict[str, list[str]]:
    """Small Vinyals-style split files over the fixture characters."""
    def lines(rows):
        return [f"{r.alphabet}/{r.character}/rot{q:03d}" for r in rows for q in (0, 90, 180, 270)]

    background = drawn["background"][1]
    splits = {
        "train": lines(background[:3]),
        "val": lines(background[3:]),
        "test": lines(drawn["evaluation"][1]),
    }
    splits["trainval"] = splits["train"] + splits["val"]
    folder.mkdir(parents=True, exist_ok=True)
    for name, entries in splits.items():
        (folder / f"{name}.txt").write_text("\n".join(entries) + "\n")
    return splits


@pytest.fixture
def png_tree(tmp_path: Path):
    """``(data_root, drawn)`` with the PNG tree at ``data_root/omniglot-py``, as torchvision unpacks it."""
    data_root = tmp_path / "data"
    return data_root, build_png_tree(data_root / "omniglot-py")


@pytest.fixture
def split_dir(tmp_path: Path, png_tree) -> Path:
    folder = tmp_path / "vinyals-splits"
    write_split_files(folder, png_tree[1])
    return folder


def _no_temp_files(folder: Path) -> bool:
    return not list(folder.rglob("*.tmp"))


# ---------------------------------------------------------------- PNG tree → npz


def test_read_png_tree_pixel_for_pixel(png_tree):
    data_root, drawn = png_tree
    for set_name, (images, rows) in drawn.items():
        read, read_rows = read_png_tree(data_root / "omniglot-py", set_name)
        assert read.dtype == np.bool_ and read.shape == images.shape
        np.testing.assert_array_equal(read, images)
        assert read_rows == rows
        # the set folder itself is accepted too
        again, _ = read_png_tree(data_root / "omniglot-py" / f"images_{set_name}", set_name)
        np.testing.assert_array_equal(again, images)


def test_rows_follow_character_ids_not_folder_names(png_tree):
    data_root, _ = png_tree
    rows = [row for row, _ in scan_png_tree(data_root / "omniglot-py", "background")]
    assert [r.alphabet for r in rows] == ["Zulu_(test)"] * 3 + ["Alpha"] * 2
    assert [r.char_id for r in rows] == [1, 2, 3, 4, 5]
    assert [r.row for r in rows] == [0, 1, 2, 3, 4]


def test_prepare_converts_tree(png_tree, split_dir):
    data_root, drawn = png_tree
    out = prepare_omniglot(data_root, download=False, splits_from=split_dir)
    assert out == data_root / "omniglot"
    for set_name, (images, rows) in drawn.items():
        with np.load(out / f"images_{set_name}.npz") as archive:
            assert sorted(archive.files) == ["images", "labels"]
            np.testing.assert_array_equal(archive["images"], images)
            assert archive["labels"].dtype == np.int64
            np.testing.assert_array_equal(archive["labels"], np.repeat(np.arange(len(rows))[:, None], 20, axis=1))
    with open(out / "characters.csv", newline="") as handle:
        table = list(csv.reader(handle))
    expected = [r for set_name in ("background", "evaluation") for r in drawn[set_name][1]]
    assert table[0] == ["char_id", "set", "row", "alphabet", "character"]
    assert table[1:] == [[str(r.char_id), r.set, str(r.row), r.alphabet, r.character] for r in expected]
    for name in SPLIT_NAMES:
        assert (out / "splits" / "vinyals" / f"{name}.txt").read_text() == (split_dir / f"{name}.txt").read_text()
    assert _no_temp_files(data_root)


def test_loads_through_both_protocols(png_tree, split_dir, cache_dir):
    data_root, drawn = png_tree
    prepare_omniglot(data_root, download=False, splits_from=split_dir)

    lake = load_omniglot(data_root, "lake", "train", cache_dir, image_size=105)
    images, rows = drawn["background"]
    assert lake.class_names == tuple(f"{r.alphabet}/{r.character}" for r in rows)
    expected = torch.from_numpy(~images).to(torch.uint8).mul(255).reshape(-1, 1, 105, 105)
    assert torch.equal(lake.images, expected)  # inverted: ink = 255
    assert lake.class_sizes().tolist() == [20] * len(rows)
    assert load_omniglot(data_root, "lake", "test", cache_dir, image_size=28).images.shape == (4 * 20, 1, 28, 28)

    test = load_omniglot(data_root, "vinyals", "test", cache_dir, image_size=105)
    assert test.num_classes == 4 * 4
    ink = torch.from_numpy(~drawn["evaluation"][0]).to(torch.uint8).mul(255)
    for index, row in enumerate(drawn["evaluation"][1]):
        base = f"{row.alphabet}/{row.character}"
        upright = test.images[test.members(test.class_names.index(f"{base}/rot000"))]
        assert torch.equal(upright[:, 0], ink[index])
        for quarter in (1, 2, 3):
            turned = test.images[test.members(test.class_names.index(f"{base}/rot{90 * quarter:03d}"))]
            assert torch.equal(turned, torch.rot90(upright, k=quarter, dims=(-2, -1)))

    small = load_omniglot(data_root, "vinyals", "train", cache_dir, image_size=28)
    assert small.num_classes == 3 * 4 and small.images.dtype == torch.uint8
    first = small.images[small.members(0)]
    assert torch.equal(small.images[small.members(1)], torch.rot90(first, k=1, dims=(-2, -1)))


def fail(*args, **kwargs):
    raise AssertionError("nothing should be downloaded")


OFFLINE_SOURCES = OmniglotSources(download_images=fail, fetch_split=fail)


def test_prepare_keeps_existing_form(png_tree, split_dir):
    data_root, _ = png_tree
    out = prepare_omniglot(data_root, download=False, splits_from=split_dir)
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    shutil.rmtree(data_root / "omniglot-py")  # nothing left to convert from: a conversion would fail
    assert prepare_omniglot(data_root, download=True, sources=OFFLINE_SOURCES) == out
    assert stamps == {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}


def test_converts_zips_left_unpacked(tmp_path, split_dir):
    source = tmp_path / "source"
    drawn = build_png_tree(source)
    png_root = tmp_path / "zipped" / "omniglot-py"
    png_root.mkdir(parents=True)
    for set_name in TREE:
        with zipfile.ZipFile(png_root / f"images_{set_name}.zip", "w") as archive:
            for path in sorted((source / f"images_{set_name}").rglob("*.png")):
                archive.write(path, path.relative_to(source).as_posix())
    out = prepare_omniglot(tmp_path / "zipped", download=False, splits_from=split_dir)
    with np.load(out / "images_evaluation.npz") as archive:
        np.testing.assert_array_equal(archive["images"], drawn["evaluation"][0])


# ---------------------------------------------------------------- download path, offline


def test_prepare_downloads_when_nothing_is_there(tmp_path):
    source = tmp_path / "official"
    drawn = build_png_tree(source)
    splits = write_split_files(tmp_path / "remote-splits", drawn)
    downloads, fetched = [], []

    def fake_download(root, background):
        """Unpacks the fixture tree where torchvision.datasets.Omniglot would."""
        downloads.append((root, background))
        set_name = "background" if background else "evaluation"
        shutil.copytree(source / f"images_{set_name}", Path(root) / "omniglot-py" / f"images_{set_name}")

    def fake_fetch(name):
        fetched.append(name)
        return "\n".join(splits[name]) + "\n"

    data_root = tmp_path / "data"
    out = prepare_omniglot(data_root, sources=OmniglotSources(download_images=fake_download, fetch_split=fake_fetch))

    assert downloads == [(data_root, True), (data_root, False)]
    assert sorted(fetched) == sorted(SPLIT_NAMES)
    assert has_npz_form(out)
    with np.load(out / "images_background.npz") as archive:
        np.testing.assert_array_equal(archive["images"], drawn["background"][0])
    assert (out / "splits" / "vinyals" / "test.txt").read_text().split() == splits["test"]
    assert load_omniglot(data_root, "vinyals", "val", tmp_path / "cache").num_classes == 2 * 4


def test_fetch_split_url_and_timeout():
    seen = {}

    class Response(io.BytesIO):
        def __exit__(self, *exc):
            return False

    def fake_urlopen(url, timeout=None):
        seen.update(url=url, timeout=timeout)
        return Response(b"Greek/character01/rot000\n")

    assert fetch_split("val", open_url=fake_urlopen) == "Greek/character01/rot000\n"
    assert seen["url"] == SPLITS_URL.format(name="val")
    assert seen["url"] == (
        "https://raw.githubusercontent.com/jakesnell/prototypical-networks/master/data/splits/vinyals/val.txt"
    )
    assert seen["timeout"] and seen["timeout"] > 0


def test_offline_splits_give_a_clear_error(png_tree, split_dir):
    data_root, _ = png_tree

    def offline(name):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    with pytest.raises(UserError, match="--splits-from"):
        prepare_omniglot(data_root, sources=OmniglotSources(download_images=fail, fetch_split=offline))
    out = data_root / "omniglot"
    assert has_npz_form(out)  # the conversion itself is kept
    assert not (out / "splits" / "vinyals" / "train.txt").exists()
    # the hint works: a second run with the files given completes without the network
    prepare_omniglot(data_root, splits_from=split_dir)
    assert all((out / "splits" / "vinyals" / f"{n}.txt").is_file() for n in SPLIT_NAMES)


def test_offline_download_gives_a_clear_error(tmp_path):
    def offline(root, background):
        raise RuntimeError("Error downloading images_background.zip")

    with pytest.raises(UserError, match="could not download Omniglot"):
        prepare_omniglot(tmp_path / "data", sources=OmniglotSources(download_images=offline, fetch_split=fail))
    with pytest.raises(UserError, match="Omniglot not found"):
        prepare_omniglot(tmp_path / "data", download=False)


def test_split_files_are_validated(png_tree, tmp_path):
    data_root, drawn = png_tree
    bad = tmp_path / "bad-splits"
    write_split_files(bad, drawn)
    (bad / "val.txt").write_text("Alpha/character01/rot000\nNowhere/character01/rot000\n")
    with pytest.raises(UserError, match="Nowhere/character01"):
        prepare_omniglot(data_root, download=False, splits_from=bad)
    (bad / "val.txt").write_text("Alpha/character01/rot045\n")
    with pytest.raises(UserError, match="rot045"):
        prepare_omniglot(data_root, download=False, splits_from=bad)


# ---------------------------------------------------------------- broken input, interrupted writes


def test_broken_trees_are_named(png_tree):
    data_root, drawn = png_tree
    png_root = data_root / "omniglot-py"
    broken = png_root / "images_evaluation" / "Beta" / "character01" / "0008_05.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(UserError, match="0008_05.png"):
        read_png_tree(png_root, "evaluation")
    missing = png_root / "images_background" / "Alpha" / "character02" / "0005_20.png"
    missing.unlink()
    with pytest.raises(UserError, match="character02"):
        read_png_tree(png_root, "background")


def test_interrupted_write_leaves_no_complete_looking_form(png_tree, split_dir):
    data_root, drawn = png_tree
    out = data_root / "omniglot"
    # a conversion stopped after the background set (here by an unreadable evaluation image)
    broken = next((data_root / "omniglot-py" / "images_evaluation").rglob("*.png"))
    original = broken.read_bytes()
    broken.write_bytes(original[:20])
    with pytest.raises(UserError, match=broken.name):
        prepare_omniglot(data_root, download=False, splits_from=split_dir)
    assert (out / "images_background.npz").exists() and not has_npz_form(out)

    # a write stopped midway leaves neither the file nor its temporary
    def die_while_writing(stream):
        stream.write(b"PK\x03\x04 half an archive")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(out / "images_evaluation.npz", die_while_writing)
    assert not (out / "images_evaluation.npz").exists() and _no_temp_files(data_root)

    broken.write_bytes(original)
    prepare_omniglot(data_root, download=False, splits_from=split_dir)
    with np.load(out / "images_evaluation.npz") as archive:
        np.testing.assert_array_equal(archive["images"], drawn["evaluation"][0])


# ---------------------------------------------------------------- the real data


@pytest.mark.real_data
def test_scan_order_reproduces_real_characters_csv(real_omniglot_root, tmp_path):
    """A tree with the real alphabet/character names and ids (empty files) scans to the shared characters.csv."""
    reference = (real_omniglot_root / "omniglot" / "characters.csv").read_text().splitlines()
    rows = list(csv.DictReader(reference))
    png_root = tmp_path / "omniglot-py"
    for row in rows[::-1]:  # creation order must not matter
        folder = png_root / f"images_{row['set']}" / row["alphabet"] / row["character"]
        folder.mkdir(parents=True)
        for drawer in range(1, 21):
            (folder / f"{int(row['char_id']):04d}_{drawer:02d}.png").touch()
    scanned = [r for s in ("background", "evaluation") for r, _ in scan_png_tree(png_root, s)]
    assert [f"{r.char_id},{r.set},{r.row},{r.alphabet},{r.character}" for r in scanned] == reference[1:]


@pytest.mark.real_data
def test_png_round_trip_of_real_characters(real_omniglot_root, tmp_path):
    """The first real characters written as 1-bit PNGs under their real names read back identically."""
    folder = real_omniglot_root / "omniglot"
    rows = [r for r in csv.DictReader(open(folder / "characters.csv", newline="")) if r["set"] == "background"][:40]
    with np.load(folder / "images_background.npz") as archive:
        real = archive["images"][: len(rows)]
    png_root = tmp_path / "omniglot-py"
    for row, images in zip(rows, real):
        target = png_root / "images_background" / row["alphabet"] / row["character"]
        target.mkdir(parents=True)
        for drawer, paper in enumerate(images):
            _write_png(target / f"{int(row['char_id']):04d}_{drawer + 1:02d}.png", paper, one_bit=True)
    read, read_rows = read_png_tree(png_root, "background")
    np.testing.assert_array_equal(read, real)
    assert [(r.char_id, r.alphabet, r.character) for r in read_rows] == [
        (int(r["char_id"]), r["alphabet"], r["character"]) for r in rows
    ]


@pytest.mark.real_data
def test_real_omniglot_protocols(real_omniglot_root, real_cache_dir):
    expected = {
        ("vinyals", "train"): 4112,
        ("vinyals", "val"): 688,
        ("vinyals", "test"): 1692,
        ("vinyals", "trainval"): 4800,
        ("lake", "train"): 964,
        ("lake", "test"): 659,
    }
    for (protocol, split), classes in expected.items():
        data = load_omniglot(real_omniglot_root, protocol, split, real_cache_dir)
        assert data.num_classes == classes, (protocol, split)
        assert data.images.dtype == torch.uint8 and data.image_shape == (1, 28, 28)
        assert data.class_sizes().eq(20).all()
        assert data.name == f"omniglot/{protocol}/{split}"
    test = load_omniglot(real_omniglot_root, "vinyals", "test", real_cache_dir)
    assert test.class_names[:2] == ("Gurmukhi/character42/rot000", "Gurmukhi/character42/rot090")
    upright = test.images[test.members(0)]
    assert torch.equal(test.images[test.members(1)], torch.rot90(upright, k=1, dims=(-2, -1)))
    assert upright.float().mean() < 128  # inverted: mostly blank (0) paper


@pytest.mark.real_data
def test_real_omniglot_resize_is_cached(real_omniglot_root, real_cache_dir):
    load_omniglot(real_omniglot_root, "lake", "test", real_cache_dir)  # fills the cache if not yet done
    cache_files = sorted(real_cache_dir.glob("omniglot-*-28-*.pt"))
    assert len(cache_files) == 2
    stamps = [(p.stat().st_ino, p.stat().st_mtime_ns) for p in cache_files]
    data = load_omniglot(real_omniglot_root, "vinyals", "train", real_cache_dir)
    assert data.num_classes == 4112
    # served from those files: a miss would have resized again and written a new cache file
    assert sorted(real_cache_dir.glob("omniglot-*-28-*.pt")) == cache_files
    assert [(p.stat().st_ino, p.stat().st_mtime_ns) for p in cache_files] == stamps


def test_cli_prepare_converts_offline(png_tree, split_dir, cache_dir, capsys):
    """`fewshot-nsl data prepare omniglot` converts the fixture tree offline; the result serves a whole protocol."""
    from fewshot_nsl.cli.main import run
    from fewshot_nsl.data.registry import load_split

    data_root = png_tree[0]
    status = run(["data", "prepare", "omniglot", "--data-root", str(data_root), "--no-download", "--splits-from", str(split_dir)])
    assert status == 0, capsys.readouterr().err
    assert "omniglot ready in" in capsys.readouterr().out
    lake = load_split("omniglot", "test", "lake", data_root)
    assert lake.num_classes > 0 and lake.images.shape[1:] == (1, 28, 28)

"""``--split-ratios``: a seeded class split of one folder of class folders."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from fewshot_nsl.cli.main import run
from fewshot_nsl.data.class_split import SPLITS, ClassSplit
from fewshot_nsl.data.registry import load_split
from fewshot_nsl.errors import UserError


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.integers(1, 200), st.integers(0, 2**31 - 1))
def test_every_class_lands_in_exactly_one_split_in_the_stated_proportions(classes: int, seed: int) -> None:
    names = [f"c{i:03d}" for i in range(classes)]
    split = ClassSplit((0.64, 0.16, 0.20), seed)
    if min(round(0.64 * classes), round(0.16 * classes), classes - round(0.64 * classes) - round(0.16 * classes)) < 1:
        with pytest.raises(UserError, match="every split needs a class"):
            split.classes(names, "train")
        return
    parts = {s: split.classes(names[::-1], s) for s in SPLITS}  # input order does not matter
    assert sorted(c for part in parts.values() for c in part) == names
    assert len(parts["train"]) == round(0.64 * classes) and len(parts["val"]) == round(0.16 * classes)
    assert all(list(part) == sorted(part) for part in parts.values())
    # the permutation is the split seed's: the same seed gives the same split, drawn without global state
    torch.manual_seed(seed + 1)
    assert ClassSplit((0.64, 0.16, 0.20), seed).classes(names, "test") == parts["test"]


@settings(max_examples=60, deadline=None, derandomize=True)
# val drawn given train, so that every example leaves test at least 0.01
@given(st.floats(0.01, 0.9).flatmap(lambda train: st.tuples(st.just(train), st.floats(0.01, 0.99 - train))), st.integers(0, 10**6))
def test_the_protocol_name_reads_back_as_the_same_split(fractions: tuple[float, float], seed: int) -> None:
    train, val = fractions
    split = ClassSplit.parse(f"{train!r},{val!r},{1 - train - val!r}", seed)
    again = ClassSplit.from_protocol(split.protocol)
    names = [f"c{i}" for i in range(300)]
    assert again is not None and all(abs(a - b) < 1e-9 for a, b in zip(again.ratios, split.ratios))
    assert again.classes(names, "val") == split.classes(names, "val")


def test_seeds_differ_and_the_protocol_names_ratios_and_seed() -> None:
    names = [f"c{i}" for i in range(50)]
    a, b = ClassSplit.parse("0.64,0.16,0.20", 0), ClassSplit.parse("0.64,0.16,0.20", 1)
    assert a.classes(names, "test") != b.classes(names, "test")
    assert a.protocol == "classes-0.64-0.16-0.2-seed0"
    assert ClassSplit.from_protocol(a.protocol) == a and ClassSplit.from_protocol("vinyals") is None


@pytest.mark.parametrize(
    "ratios,message",
    [
        ("0.5,0.5", "three positive fractions"),
        ("0.7,0.2,0.2", "must sum to 1"),
        ("0.8,0.2,0", "three positive fractions"),
        ("0.9995,0.0004,0.0001", "at least 0.001"),
        ("a,b,c", "comma-separated fractions"),
    ],
)
def test_bad_ratios_are_refused(ratios: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        ClassSplit.parse(ratios)


def test_too_few_classes_for_the_ratios_is_refused() -> None:
    with pytest.raises(UserError, match="every split needs a class"):
        ClassSplit((0.8, 0.1, 0.1)).classes(["a", "b", "c"], "val")


@pytest.fixture
def flat_folder(tmp_path: Path) -> Path:
    """<root>/<class>/<image>: 10 classes of 3 gray images, pixel value = class index."""
    root = tmp_path / "letters"
    for c in range(10):
        (root / f"k{c}").mkdir(parents=True)
        for i in range(3):
            Image.new("L", (6, 6), 20 * c).save(root / f"k{c}" / f"{i}.png")
    return root


def test_a_flat_folder_loads_by_split_and_trains_through_the_cli(flat_folder: Path, cache_dir: Path, tmp_path: Path, monkeypatch) -> None:
    protocol = ClassSplit.parse("0.6,0.2,0.2", 3).protocol
    parts = {s: load_split(str(flat_folder), s, protocol, image_size=6) for s in SPLITS}
    assert sorted(n for part in parts.values() for n in part.class_names) == [f"k{c}" for c in range(10)]
    assert [part.num_classes for part in parts.values()] == [6, 2, 2]
    for part in parts.values():  # each image came from its class folder
        for label, name in enumerate(part.class_names):
            assert (part.images[part.labels == label] == 20 * int(name[1:])).all()
    assert parts["test"].name == f"folder/letters/{protocol}/test"

    monkeypatch.chdir(tmp_path)
    argv = ["train", "--dataset", str(flat_folder), "--split-ratios", "0.6,0.2,0.2", "--split-seed", "3", "--image-size",
            "16", "--ways", "2", "--shots", "1", "--queries", "1", "--val-ways", "2", "--val-queries", "1",
            "--val-episodes", "2", "--episodes", "2", "--run-dir", "run", "--no-progress"]  # fmt: skip
    assert run(argv) == 0
    assert f"protocol: {protocol}" in (tmp_path / "run" / "config.yaml").read_text()
    assert run(["eval", "--run-dir", "run", "--ways", "2", "--shots", "1", "--queries", "1", "--episodes", "3", "--no-progress"]) == 0
    assert run(["train", "--dataset", str(flat_folder), "--split-ratios", "0.6,0.2,0.2", "--protocol", "folder", "--run-dir", "r2"]) == 2

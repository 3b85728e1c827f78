"""Bad data through the CLI: one line saying what to do, exit status 2, no run directory left behind."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fewshot_nsl.cli.main import run
from fewshot_nsl.data.roots import CACHE_ENV

TRAIN = ["train", "--method", "protonet", "--backbone", "conv4", "--episodes", "1", "--ways", "2", "--shots", "1",
         "--queries", "1", "--run-dir", "run", "--no-progress"]  # fmt: skip


def image_folder(root: Path) -> Path:
    """<root>/<split>/<class>/<image>, two classes of two PNGs per split."""
    for split in ("train", "val", "test"):
        for name in ("a", "b"):
            (root / split / name).mkdir(parents=True)
            for index in range(2):
                Image.new("RGB", (10, 10), (40 * index, 90, 0)).save(root / split / name / f"{index}.png")
    return root


def truncated_jpeg(root: Path) -> Path:
    path = root / "train" / "b" / "photo.jpg"
    Image.new("RGB", (32, 32), (200, 0, 0)).save(path)
    path.write_bytes(path.read_bytes()[:200])
    return path


def not_an_image(root: Path) -> Path:
    path = root / "train" / "a" / "notes.png"
    path.write_text("shopping list")
    return path


def archive_only(root: Path) -> Path:
    (root / "miniimagenet").mkdir(parents=True)
    (root / "miniimagenet" / "mini-imagenet.tar.gz").write_bytes(b"\x1f\x8b")
    return root


def broken_omniglot(root: Path) -> Path:
    folder = root / "omniglot"
    folder.mkdir(parents=True)
    for set_name in ("background", "evaluation"):
        (folder / f"images_{set_name}.npz").write_bytes(b"PK\x03\x04 cut short")
    (folder / "characters.csv").write_text("char_id,set,row,alphabet,character\n0,background,0,A,c01\n")
    return folder / "images_background.npz"


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path


def made(folder: Path) -> Path:
    folder.mkdir(parents=True)
    return folder


# Each case builds its bad input under the work folder and returns (extra CLI arguments, expected message).
CASES = {
    "missing data root": lambda w: (
        ["--dataset", "omniglot", "--data-root", str(w / "nowhere")], "run `fewshot-nsl data prepare omniglot`"),
    "empty data root": lambda w: (
        ["--dataset", "miniimagenet", "--data-root", str(made(w / "empty"))], "miniimagenet does not exist"),
    "empty dataset folder": lambda w: (
        ["--dataset", "miniimagenet", "--data-root", str(made(w / "e" / "miniimagenet").parent)], "miniimagenet is empty"),
    "unrecognised format": lambda w: (
        ["--dataset", "miniimagenet", "--data-root", str(archive_only(w / "arch"))],
        "mini-imagenet.tar.gz is an archive or array file, a format fewshot-nsl does not read: extract or convert it"),
    "validation ways above the val split": lambda w: (
        ["--dataset", str(image_folder(w / "pets"))], "5-way episodes need 5 classes but folder/pets/val has 2; lower --val-ways"),
    "empty image folder": lambda w: (["--dataset", str(made(w / "pets"))], "has no 'train' split"),
    "truncated image": lambda w: (
        ["--dataset", str(image_folder(w / "pets"))], f"cannot decode image {truncated_jpeg(w / 'pets')}"),
    "non-image file": lambda w: (
        ["--dataset", str(image_folder(w / "pets"))], f"cannot decode image {not_an_image(w / 'pets')}"),
    "corrupted archive": lambda w: (
        ["--dataset", "omniglot", "--data-root", str(w / "og")],
        f"{broken_omniglot(w / 'og')} is not a readable Omniglot archive"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_data_gives_one_line_naming_what_to_do(case: str, workdir: Path, capsys: pytest.CaptureFixture[str]):
    arguments, message = CASES[case](workdir)
    assert run(TRAIN + arguments) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    if "image" in case and "folder" not in case:
        assert err.endswith("replace or delete the file, then run again")
    assert not (workdir / "run").exists(), "a failed start must not leave a run directory behind"


def test_data_bad_input_then_fixed_input_trains(workdir: Path):
    """The first failure leaves nothing that blocks the rerun once the file is fixed."""
    root = image_folder(workdir / "pets")
    broken = truncated_jpeg(root)
    argv = TRAIN + ["--dataset", str(root), "--val-ways", "2", "--val-queries", "1", "--val-every", "1", "--val-episodes", "2"]
    assert run(argv) == 2
    broken.unlink()
    assert run(argv) == 0
    metrics = pd.read_csv(workdir / "run" / "metrics.csv")
    assert set(metrics["split"]) == {"train", "val"}
    assert np.isfinite(metrics.query("split == 'train'")["loss"]).all()


@pytest.mark.parametrize(
    "argv,message",
    [
        (["train", "--shots", "2.5"], "argument --shots: invalid int value: '2.5'; see `fewshot-nsl train --help`"),
        (["trian"], "invalid choice: 'trian'"),
        (["eval", "--ways"], "argument --ways: expected one argument"),
    ],
)
def test_usage_errors_are_one_line_with_status_2(argv, message, capsys: pytest.CaptureFixture[str]):
    with pytest.raises(SystemExit) as stopped:
        run(argv)
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize(("flag", "value", "low"), [("--ways", "1", 2), ("--shots", "0", 1), ("--queries", "-3", 1)])
def test_counts_below_their_minimum_are_refused(flag, value, low, workdir: Path, capsys: pytest.CaptureFixture[str]):
    assert run(["train", flag, value, "--run-dir", "run"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{flag.removeprefix('--')} must be >= {low}, got {value}" in err and len(err.splitlines()) == 1, err
    assert not (workdir / "run").exists()

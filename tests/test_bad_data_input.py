"""Bad data through the CLI: one line saying what to do, exit status 2, no run directory left behind."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
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


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--backbone", "resnet12", "--drop-rate", "1.5"], "drop_rate must be in [0, 1), got 1.5"),
        (["--drop-rate", "0.1"], "--drop-rate is ResNet-12's DropBlock; conv4 has none"),
        (["--weight-decay", "-1"], "weight_decay must be a finite number >= 0, got -1.0"),
        (["--lr", "nan"], "lr must be a finite number > 0, got nan"),
        (["--lr-step", "0"], "lr_step must be >= 1, got 0"),
        (["--width", "0"], "width must be >= 1, got 0"),
        (["--width", "-1"], "width must be >= 1, got -1"),
        (["--image-size", "-5"], "image_size must be >= 1, got -5"),
        (["--val-ways", "0"], "val_ways must be >= 2, got 0"),
        (["--val-shots", "0"], "val_shots must be >= 1, got 0"),
        (["--val-queries", "0"], "val_queries must be >= 1, got 0"),
        (["--device", "cuda:abc"], "--device must be auto, cpu or cuda (or cuda:N"),
    ],
)
def test_settings_out_of_range_are_one_line_errors(argv, message, workdir: Path, capsys: pytest.CaptureFixture[str]):
    assert run(["train", *argv, "--run-dir", "run"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (workdir / "run").exists()


def test_an_unknown_distance_in_a_config_file_is_a_one_line_error(workdir: Path, capsys: pytest.CaptureFixture[str]):
    (workdir / "run.yaml").write_text("distance: manhattan\n")
    assert run(["train", "--config", "run.yaml", "--run-dir", "run"]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown distance 'manhattan'; choose one of euclidean, cosine" in err and len(err.splitlines()) == 1, err


def small_run(workdir: Path, run_dir: str = "run", *extra: str) -> list[str]:
    """Training arguments for a tiny ProtoNet run on a two-class image folder (about a second), validated once."""
    root = workdir / "pets" if (workdir / "pets").exists() else image_folder(workdir / "pets")
    return [*TRAIN[:-3], "--run-dir", run_dir, "--no-progress", "--dataset", str(root), "--width", "8", "--image-size", "16",
            "--val-ways", "2", "--val-queries", "1", "--val-episodes", "2", "--val-every", "1", *extra]  # fmt: skip


def test_a_setting_that_cannot_train_touches_no_run_directory(workdir: Path, capsys: pytest.CaptureFixture[str]):
    """Checked before the run directory is prepared: --overwrite moves nothing aside, a new folder is not created."""
    assert run(small_run(workdir)) == 0
    before = {p.name: p.stat().st_mtime_ns for p in (workdir / "run").iterdir()}
    capsys.readouterr()
    for extra, message in (
        (["--image-size", "8"], "too small for 4 pooling blocks"),  # found when the learner is built
        (["--init", "run", "--width", "16"], "does not fit this run's"),  # --init: another width
    ):
        assert run(small_run(workdir, "run", *extra, "--overwrite")) == 2
        assert run(small_run(workdir, "fresh", *extra)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert all(message in line for line in err) and len(err) == 2, err
    assert {p.name: p.stat().st_mtime_ns for p in (workdir / "run").iterdir()} == before
    assert sorted(p.name for p in workdir.iterdir() if p.name.startswith(("run", "fresh"))) == ["run"]


def test_a_run_dir_that_is_a_file_is_refused(workdir: Path, capsys: pytest.CaptureFixture[str]):
    (workdir / "notes").write_text("keep me")
    assert run(small_run(workdir, "notes")) == 2
    assert "--run-dir notes is a file, not a folder" in capsys.readouterr().err
    assert (workdir / "notes").read_text() == "keep me"


@pytest.fixture
def trained(workdir: Path) -> Path:
    assert run(small_run(workdir)) == 0
    return workdir / "run"


EVAL = ["eval", "--run-dir", "run", "--ways", "2", "--shots", "1", "--queries", "1", "--episodes", "3", "--no-progress"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--episodes", "-3"], "--episodes must be >= 1, got -3"),
        (["--episodes", "0"], "--episodes must be >= 1, got 0"),
        (["--ways", "0"], "--ways must be >= 2, got 0"),
        (["--shots", "0"], "--shots must be >= 1, got 0"),
        (["--queries", "0"], "--queries must be >= 1, got 0"),
        (["--manifest", "m.npz"], "--manifest fixes the episodes and their task; drop --ways, --shots, --queries, --episodes"),
        (["--leaderboard", "."], ". is a folder, not a leaderboard CSV"),
        (["--leaderboard", "notes/board.csv"], "notes is a file"),
    ],
)
def test_eval_refuses_bad_requests_before_evaluating(
    extra, message, trained: Path, workdir: Path, capsys: pytest.CaptureFixture[str]
):
    (workdir / "notes").write_text("a file")
    capsys.readouterr()
    assert run(EVAL + extra) == 2  # a later flag overrides EVAL's
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (trained / "eval").exists(), "nothing was evaluated"


def test_eval_refuses_a_broken_leaderboard_before_evaluating_and_leaves_it(trained: Path, workdir: Path, capsys):
    (workdir / "board.csv").write_text("method,dataset,acc\nprotonet,omniglot,eighty\n")
    assert run(EVAL + ["--leaderboard", "board.csv"]) == 2
    assert "row 2 has acc 'eighty'" in capsys.readouterr().err
    assert (workdir / "board.csv").read_text() == "method,dataset,acc\nprotonet,omniglot,eighty\n"
    assert not (trained / "eval").exists()
    assert run(["leaderboard", "--csv", "."]) == 2
    assert ". is a folder, not a leaderboard CSV" in capsys.readouterr().err


def test_best_and_last_checkpoints_are_evaluated_apart(trained: Path, workdir: Path, capsys):
    for checkpoint in ("best", "last"):
        assert run(EVAL + ["--checkpoint", checkpoint]) == 0
    assert "(last checkpoint): acc" in capsys.readouterr().out
    board = pd.read_csv(workdir / "leaderboard.csv")
    assert board["eval_checkpoint"].tolist() == ["best", "last"]
    files = {p.name for p in (trained / "eval").iterdir()}
    assert files == {f"{board['manifest'][0]}.csv", f"{board['manifest'][0]}-last.csv"}


def test_damaged_run_files_and_a_missing_best_checkpoint_are_one_line_errors(trained: Path, capsys):
    (trained / "best.pt").unlink()
    assert run(EVAL) == 2  # a finished run has nothing to resume
    assert "is a finished run without best.pt; use its last.pt (--checkpoint last)" in capsys.readouterr().err
    (trained / "train_summary.json").unlink()  # as if stopped before its end
    assert run(EVAL) == 2
    assert "has no best.pt yet; use its last.pt (--checkpoint last), or finish its training with `fewshot-nsl train --resume" in capsys.readouterr().err
    (trained / "train_summary.json").write_text('{"iterations": 1, "train_')
    assert run(EVAL + ["--checkpoint", "last"]) == 2
    assert "train_summary.json is damaged" in capsys.readouterr().err
    (trained / "config.yaml").write_text("method: [protonet\n")
    assert run(EVAL + ["--checkpoint", "last"]) == 2
    err = capsys.readouterr().err.strip()
    assert "config.yaml is damaged" in err and len(err.splitlines()) == 1, err


def test_resuming_a_cuda_run_without_cuda_says_how(trained: Path, capsys):
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    (trained / "train_summary.json").unlink()  # as if stopped
    config = trained / "config.yaml"
    config.write_text(config.read_text().replace("device: auto", "device: cuda"))
    assert run(["train", "--resume", "run"]) == 2
    assert "set `device: cpu` in run/config.yaml" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["data", "prepare", "miniimagenet", "--splits-from", "x"], "--splits-from is Omniglot's"),
        (["data", "prepare", "omniglot", "--source", "x", "--data-root", "og"], "--source would not be read"),
    ],
)
def test_data_prepare_flags_that_would_be_ignored_are_refused(argv, message, workdir: Path, capsys):
    (workdir / "og" / "omniglot").mkdir(parents=True)
    for set_name in ("background", "evaluation"):
        (workdir / "og" / "omniglot" / f"images_{set_name}.npz").write_bytes(b"")
    (workdir / "og" / "omniglot" / "characters.csv").write_text("")
    assert run(argv) == 2
    assert message in capsys.readouterr().err

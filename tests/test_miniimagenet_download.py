"""``data prepare miniimagenet``: download (with a stand-in for the network), offline, hostile files, --source."""

from __future__ import annotations

import pickle
import urllib.error
from pathlib import Path

import numpy as np
import pytest

from fewshot_nsl.cli.main import run
from fewshot_nsl.data.miniimagenet import RAVI_CLASSES, load_miniimagenet, prepare_miniimagenet
from fewshot_nsl.data.miniimagenet_download import DRIVE_IDS, download_miniimagenet
from fewshot_nsl.errors import UserError
from tests.hostile_pickles import RunsCode

SPLIT_OF_ID = {file_id: split for split, file_id in DRIVE_IDS.items()}


def cache_bytes(split: str, per_class: int = 2) -> bytes:
    """A small cache in the distributed format: Ravi's class count for the split, ``per_class`` images each."""
    classes = RAVI_CLASSES[split]
    images = np.random.default_rng(classes).integers(0, 256, (classes * per_class, 84, 84, 3), dtype=np.uint8)
    class_dict = {f"n{split}{c:03d}": list(range(c * per_class, (c + 1) * per_class)) for c in range(classes)}
    return pickle.dumps({"image_data": images, "class_dict": class_dict}, protocol=4)


class FakeDrive:
    """Stands in for Google Drive: serves fixture caches by file id and records what was asked for."""

    def __init__(self, broken: dict[str, bytes] | None = None):
        self.asked: list[str] = []
        self.broken = broken or {}

    def __call__(self, file_id: str, destination: Path) -> None:
        split = SPLIT_OF_ID[file_id]
        self.asked.append(split)
        destination.write_bytes(self.broken.get(split) or cache_bytes(split))


def test_download_fetches_each_split_once_and_the_loader_reads_them(tmp_path: Path, cache_dir: Path) -> None:
    drive = FakeDrive()
    folder = download_miniimagenet(tmp_path, fetch=drive)
    assert sorted(drive.asked) == ["test", "train", "val"]
    assert sorted(p.name for p in folder.iterdir()) == [
        "mini-imagenet-cache-test.pkl", "mini-imagenet-cache-train.pkl", "mini-imagenet-cache-validation.pkl"]  # fmt: skip
    val = load_miniimagenet(tmp_path, "val", cache_dir)
    assert val.num_classes == 16 and len(val.images) == 32
    download_miniimagenet(tmp_path, fetch=drive)  # already there: nothing fetched again
    assert len(drive.asked) == 3


def test_offline_is_one_clear_error_and_leaves_no_partial_file(tmp_path: Path) -> None:
    def offline(file_id: str, destination: Path) -> None:
        destination.write_bytes(b"half a file")
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    with pytest.raises(UserError, match=r"cannot download Mini-ImageNet's train split .*--source DIR.*--data-root") as error:
        download_miniimagenet(tmp_path, fetch=offline)
    assert "mini-imagenet-cache-{train,validation,test}.pkl" in str(error.value)
    assert list((tmp_path / "miniimagenet").iterdir()) == []


def test_a_hostile_download_is_refused_runs_nothing_and_is_deleted(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    drive = FakeDrive(broken={"val": pickle.dumps(RunsCode(marker))})
    with pytest.raises(UserError, match="downloaded val file was refused and deleted"):
        download_miniimagenet(tmp_path / "data", fetch=drive)
    assert not marker.exists()
    assert sorted(p.name for p in (tmp_path / "data" / "miniimagenet").iterdir()) == ["mini-imagenet-cache-train.pkl"]


def test_a_copy_of_pickle_caches_is_checked_and_linked(tmp_path: Path) -> None:
    source = tmp_path / "my-copy"
    source.mkdir()
    for split, name in (("train", "train"), ("val", "validation"), ("test", "test")):
        (source / f"mini-imagenet-cache-{name}.pkl").write_bytes(cache_bytes(split, per_class=1))
    linked = prepare_miniimagenet(source, tmp_path / "data")
    assert linked.resolve() == source.resolve()
    (source / "mini-imagenet-cache-test.pkl").write_bytes(cache_bytes("val", per_class=1))
    with pytest.raises(UserError, match="has 16 classes; the Ravi test split has 20"):
        prepare_miniimagenet(source, tmp_path / "other")


def test_cli_without_network_or_with_no_download(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["data", "prepare", "miniimagenet", "--data-root", str(tmp_path), "--no-download"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--no-download; accepted formats: <split>/<wnid>/*.jpg folders" in err and len(err.splitlines()) == 1

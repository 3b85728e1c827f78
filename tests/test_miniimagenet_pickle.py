"""Mini-ImageNet pickle caches (learn2learn's format), read without ever running the file's code."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from fewshot_nsl.data.miniimagenet import load_miniimagenet
from fewshot_nsl.data.safe_pickle import load_plain_pickle
from fewshot_nsl.errors import UserError
from tests.hostile_pickles import RunsCode


def write_cache(folder: Path, split_name: str, classes: dict[str, int], seed: int, protocol: int = 4) -> np.ndarray:
    """A ``mini-imagenet-cache-<split>.pkl`` with interleaved class indices; returns the image array."""
    generator = torch.Generator().manual_seed(seed)
    total = sum(classes.values())
    images = torch.randint(0, 256, (total, 84, 84, 3), generator=generator, dtype=torch.uint8).numpy()
    order = torch.randperm(total, generator=generator).tolist()
    class_dict, start = {}, 0
    for name, count in classes.items():
        class_dict[name] = order[start : start + count]
        start += count
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"mini-imagenet-cache-{split_name}.pkl", "wb") as handle:
        pickle.dump({"image_data": images, "class_dict": class_dict}, handle, protocol=protocol)
    return images


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_pickle_cache_gives_sorted_classes_and_their_images(tmp_path: Path, protocol: int) -> None:
    classes = {"n02": 3, "n01": 4}
    images = write_cache(tmp_path / "miniimagenet", "validation", classes, seed=1, protocol=protocol)
    data = load_miniimagenet(tmp_path, "val", tmp_path / "cache")
    assert data.class_names == ("n01", "n02") and data.class_sizes().tolist() == [4, 3]
    assert data.images.shape == (7, 3, 84, 84) and data.images.dtype == torch.uint8
    with open(tmp_path / "miniimagenet" / "mini-imagenet-cache-validation.pkl", "rb") as handle:
        class_dict = pickle.load(handle)["class_dict"]  # the test's own trusted file
    first_of_n02 = torch.from_numpy(images[class_dict["n02"][0]]).permute(2, 0, 1)
    assert torch.equal(data.images[data.members(1)[0]], first_of_n02)


def test_a_pickle_that_would_run_code_is_refused_and_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    folder = tmp_path / "miniimagenet"
    folder.mkdir()
    path = folder / "mini-imagenet-cache-test.pkl"
    path.write_bytes(pickle.dumps({"image_data": RunsCode(marker), "class_dict": {}}))
    with pytest.raises(UserError, match="posix.system is not plain data|os.system is not plain data"):
        load_plain_pickle(path)
    with pytest.raises(UserError, match="refusing to unpickle"):
        load_miniimagenet(tmp_path, "test", tmp_path / "cache")
    assert not marker.exists()


def test_malformed_pickle_caches_get_clear_errors(tmp_path: Path) -> None:
    folder = tmp_path / "miniimagenet"
    folder.mkdir()
    path = folder / "mini-imagenet-cache-test.pkl"
    path.write_bytes(pickle.dumps({"images": np.zeros((1, 84, 84, 3), np.uint8)}))
    with pytest.raises(UserError, match="expected a dict with image_data and class_dict"):
        load_miniimagenet(tmp_path, "test", tmp_path / "cache")
    path.write_bytes(pickle.dumps({"image_data": np.zeros((2, 84, 84, 3), np.uint8), "class_dict": {"a": [0, 5]}}))
    with pytest.raises(UserError, match="outside image_data's 2 images"):
        load_miniimagenet(tmp_path, "test", tmp_path / "cache")
    path.write_bytes(b"\x80\x04truncated")
    with pytest.raises(UserError, match="not a readable pickle"):
        load_miniimagenet(tmp_path, "test", tmp_path / "cache")

"""The Python API: outside images prepared exactly like the dataset's own, and a trained run loaded to score them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fewshot_nsl.api import load_trained
from fewshot_nsl.cli.main import run as cli
from fewshot_nsl.config import RunConfig
from fewshot_nsl.data.image_folder import load_image_folder
from fewshot_nsl.data.miniimagenet import load_miniimagenet
from fewshot_nsl.data.omniglot import DRAWERS, SETS, load_omniglot
from fewshot_nsl.data.preprocess import Preprocess
from fewshot_nsl.engine.trainer import train
from fewshot_nsl.errors import UserError
from fewshot_nsl.nsl import StaticNSLConv2d
from tests.test_reader_properties import write_omniglot


def test_an_omniglot_png_comes_out_as_the_datasets_own_character(tmp_path: Path, cache_dir: Path) -> None:
    rng = np.random.default_rng(0)
    paper = {s: rng.random((2, DRAWERS, 9, 9)) < 0.7 for s in SETS}
    write_omniglot(tmp_path, paper, [("background", 0, 0)])
    data = load_omniglot(tmp_path, "lake", "train", cache_dir, image_size=6)  # resized 9 -> 6, as prepared
    png = tmp_path / "drawing.png"
    Image.fromarray(paper["background"][1, 3].astype(np.uint8) * 255).save(png)  # white paper, black ink
    preprocess = Preprocess("omniglot", 6, 1)
    assert torch.equal(preprocess.uint8(png), data.images[1 * DRAWERS + 3])
    assert torch.equal(preprocess([png]), data.to_float(data.images[1 * DRAWERS + 3 : 1 * DRAWERS + 4]))


def test_a_miniimagenet_jpeg_comes_out_as_the_datasets_own_image(tmp_path: Path, cache_dir: Path) -> None:
    rng = np.random.default_rng(1)
    folder = tmp_path / "miniimagenet" / "test" / "n01"
    folder.mkdir(parents=True)
    for index in range(2):
        Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(folder / f"n01{index:04d}.jpg")
    data = load_miniimagenet(tmp_path, "test", cache_dir, image_size=8)
    preprocess = Preprocess("miniimagenet", 8, 3)
    assert torch.equal(preprocess.uint8(folder / "n010001.jpg"), data.images[1])
    assert torch.equal(preprocess([folder / "n010001.jpg"]), data.to_float(data.images[1:2]))


def test_folder_images_come_out_as_the_readers_and_gray_follows_the_model(tmp_path: Path, cache_dir: Path) -> None:
    rng = np.random.default_rng(2)
    (tmp_path / "pets" / "train" / "cat").mkdir(parents=True)
    colour, gray = tmp_path / "pets" / "train" / "cat" / "a.png", tmp_path / "pets" / "train" / "cat" / "b.png"
    Image.fromarray(rng.integers(0, 256, (20, 14, 3), dtype=np.uint8)).save(colour)
    Image.fromarray(rng.integers(0, 256, (11, 17), dtype=np.uint8)).save(gray)
    data = load_image_folder(tmp_path / "pets", "train", cache_dir, image_size=8)
    preprocess = Preprocess("folder", 8, 3)
    assert torch.equal(preprocess.uint8(colour), data.images[0]) and torch.equal(preprocess.uint8(gray), data.images[1])
    assert torch.equal(preprocess([colour, gray]), data.to_float(data.images))
    assert Preprocess("folder", 8, 1).uint8(colour).shape == (1, 8, 8)  # a 1-channel model gets the luminance
    gray_alpha = torch.stack([torch.full((10, 10), 90, dtype=torch.uint8), torch.zeros(10, 10, dtype=torch.uint8)])
    for dataset in ("miniimagenet", "folder"):  # a gray + alpha tensor: alpha dropped, gray repeated
        assert torch.equal(Preprocess(dataset, 8, 3).uint8(gray_alpha), torch.full((3, 8, 8), 90, dtype=torch.uint8))


def test_a_trained_run_scores_outside_files_as_it_scores_the_data(
    tmp_path: Path, cache_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.test_bad_data_input import image_folder

    root = image_folder(tmp_path / "pets")
    config = RunConfig(
        method="protonet", backbone="nsl-conv4", similarity="static", width=8, dataset=str(root), image_size=16,
        ways=2, shots=1, queries=1, val_ways=2, val_queries=1, val_episodes=2, val_every=2, episodes=2,
        run_dir=str(tmp_path / "run"),
    )  # fmt: skip
    train(config, progress=False)
    run = load_trained(tmp_path / "run", device="cpu")
    assert not run.learner.training
    assert not any(isinstance(m, StaticNSLConv2d) for m in run.learner.modules())  # folded, as eval does
    files = sorted((root / "test").rglob("*.png"))
    data = load_image_folder(root, "test", cache_dir, image_size=16)
    labels = data.labels
    with torch.no_grad():
        from_files = run.learner.fit(run.images(files), labels, 2)(run.images(files))
        from_data = run.learner.fit(data.to_float(data.images), labels, 2)(data.to_float(data.images))
    torch.testing.assert_close(from_files, from_data, rtol=0, atol=0)

    # a checkpoint from before image shapes were recorded: the channels come from its first convolution
    best = tmp_path / "run" / "best.pt"
    state = torch.load(best, weights_only=True)
    del state["image_shape"]
    torch.save(state, best)
    assert load_trained(tmp_path / "run", device="cpu").preprocess == run.preprocess

    # weights that do not fit the model the config builds: the API and eval refuse them alike
    state["model"] = {k: v for k, v in state["model"].items() if not k.endswith("running_var")}
    torch.save(state, best)
    with pytest.raises(UserError, match=r"does not fit the model its config.yaml builds \(Missing key"):
        load_trained(tmp_path / "run", device="cpu")
    assert cli(["eval", "--run-dir", str(tmp_path / "run"), "--episodes", "2", "--ways", "2", "--shots", "1",
                "--queries", "1", "--no-progress"]) == 2  # fmt: skip
    assert "does not fit the model its config.yaml builds (Missing key" in capsys.readouterr().err


def test_a_checkpoint_other_than_best_or_last_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="checkpoint must be 'best' or 'last', got 'bset'"):
        load_trained(tmp_path, checkpoint="bset")

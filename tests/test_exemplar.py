"""Exemplar-CNN pretraining without labels, the logistic-regression head, and --init."""

from __future__ import annotations

import colorsys
import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression

from fewshot_nsl.cli.main import run
from fewshot_nsl.data.dataset import ImageClassSet
from fewshot_nsl.data.registry import load_split
from fewshot_nsl.data.roots import CACHE_ENV, DATA_ENV
from fewshot_nsl.data.surrogate import ExemplarTransforms, SurrogateSampler, unlabelled
from fewshot_nsl.engine.checkpoint import BEST, load_checkpoint, load_run
from fewshot_nsl.engine.evaluator import EvalRequest, select_manifest
from fewshot_nsl.episodes.episode import materialise
from fewshot_nsl.errors import UserError
from fewshot_nsl.learners import build_learner
from fewshot_nsl.learners.exemplar import ExemplarCNN
from fewshot_nsl.learners.logreg import LogisticRegressionHead
from fewshot_nsl.backbones import build_backbone
from fewshot_nsl.results import leaderboard

IDENTITY = ExemplarTransforms(
    translate=0.0, scale=(1.0, 1.0), rotate=0.0, pca_contrast=(1.0, 1.0), sv_power=(1.0, 1.0), sv_factor=(1.0, 1.0),
    sv_shift=(0.0, 0.0), hue_shift=0.0, elastic_alpha=0.0, seed_fraction=(1.0, 1.0),
)  # fmt: skip


class LabelsForbidden:
    """A split whose images are there and whose labels raise when read."""

    def __init__(self, split: ImageClassSet):
        self.images, self.mean, self.std, self.name = split.images, split.mean, split.std, split.name

    def __getattr__(self, name: str) -> object:
        raise AssertionError(f"exemplar training read the split's {name}")


def sampler(images, transforms=ExemplarTransforms(), classes=16, samples=8, batch=32, dataset_seed=0, batch_seed=1):
    return SurrogateSampler(images, classes, samples, batch, transforms, dataset_seed, torch.Generator().manual_seed(batch_seed))


def rgb_images(count: int = 12, size: int = 20, seed: int = 0) -> ImageClassSet:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8, generator=generator)
    return ImageClassSet(images, torch.arange(count) % 3, ("a", "b", "c"), (0.5,) * 3, (0.25,) * 3, "synthetic")


@pytest.fixture(scope="module")
def omniglot_train(real_omniglot_root: Path, real_cache_dir: Path) -> ImageClassSet:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_ENV, str(real_cache_dir))
        return load_split("omniglot", "train", "vinyals", str(real_omniglot_root), None)


@pytest.mark.real_data
def test_exemplar_training_never_reads_a_label_and_learns_its_surrogate_classes(omniglot_train: ImageClassSet) -> None:
    images = unlabelled(LabelsForbidden(omniglot_train))  # type: ignore[arg-type]
    draws = sampler(images, classes=16, samples=8, batch=64)
    torch.manual_seed(0)
    backbone = build_backbone("conv4", omniglot_train.image_shape)
    learner = ExemplarCNN(backbone, 16)
    optimizer = torch.optim.Adam(learner.parameters(), lr=1e-3)
    accuracies = []
    for _ in range(40):
        optimizer.zero_grad()
        accuracies.append(learner.backward_batch([draws.sample()]).accuracy)
        optimizer.step()
    # 16 surrogate classes: chance is 6%; the last batches are told apart far better.
    assert np.mean(accuracies[-5:]) > 0.6, accuracies


def test_the_surrogate_dataset_is_a_function_of_its_seed_and_batches_of_their_generator() -> None:
    images = unlabelled(rgb_images())
    one, again, other = sampler(images), sampler(images), sampler(images, dataset_seed=5)
    assert torch.equal(one.seeds, again.seeds) and not torch.equal(one.seeds, other.seeds)
    assert torch.equal(one.sample_image(3, 7), one.sample_image(3, 7))
    assert torch.equal(one.sample_image(3, 7), again.sample_image(3, 7))
    assert not torch.equal(one.sample_image(3, 7), one.sample_image(3, 6))
    first, second = one.sample(), again.sample()
    assert torch.equal(first.labels, second.labels) and torch.equal(first.images, second.images)
    assert first.images.dtype == torch.float32 and first.labels.max() < 16


def test_with_every_magnitude_at_zero_a_sample_is_its_seed_window() -> None:
    split = rgb_images()
    draws = sampler(unlabelled(split), IDENTITY)
    index = int(draws.seeds[2, 0])
    sample = draws.sample_image(2, 0)
    # PCA and HSV round trips at identity settings move a pixel by at most one grey level
    assert (sample.int() - split.images[index].int()).abs().max() <= 1


def test_pca_contrast_scales_each_principal_component() -> None:
    split = rgb_images(count=40)
    draws = sampler(unlabelled(split), dataclasses.replace(IDENTITY, pca_contrast=(0.5, 0.5)))
    pca = draws._colour[0]
    image = split.images[0]
    torch.manual_seed(0)
    out = pca(image).float() / 255
    pixels = image.float().flatten(1).t() / 255 - pca.colour_mean
    expected = (0.5 * pixels + pca.colour_mean).clamp(0, 1).t().reshape(image.shape)  # components are orthonormal
    assert (out - expected).abs().max() <= 1 / 255 + 1e-6


def test_hsv_contrast_raises_saturation_and_value_to_its_power_per_pixel() -> None:
    split = rgb_images(count=40)
    settings = dataclasses.replace(IDENTITY, sv_power=(2.0, 2.0))
    hsv = sampler(unlabelled(split), settings)._colour[1]
    image = split.images[1, :, :4, :4]
    out = hsv(image)
    for y in range(4):
        for x in range(4):
            h, s_, v = colorsys.rgb_to_hsv(*(image[:, y, x].double() / 255).tolist())
            expected = torch.tensor(colorsys.hsv_to_rgb(h, s_**2, v**2)) * 255
            assert (out[:, y, x].double() - expected).abs().max() <= 1.0


def test_bad_transform_settings_are_user_errors() -> None:
    with pytest.raises(UserError, match="unknown key"):
        ExemplarTransforms.from_mapping({"rotation": 10})
    with pytest.raises(UserError, match="range"):
        ExemplarTransforms.from_mapping({"scale": [1.4, 0.7]})
    with pytest.raises(UserError, match="surrogate-classes"):
        sampler(unlabelled(rgb_images()), classes=1)


def test_the_logistic_regression_head_is_sklearn_on_normalised_support_embeddings() -> None:
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 8, generator=generator)
    support = centres.repeat_interleave(3, 0) + 0.3 * torch.randn(15, 8, generator=generator)
    queries = centres.repeat_interleave(4, 0) + 0.3 * torch.randn(20, 8, generator=generator)
    labels = torch.arange(5).repeat_interleave(3)
    head = LogisticRegressionHead(torch.nn.Identity())
    scores = head.fit(support, labels, 5)(queries)
    normalise = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float64)  # noqa: E731
    reference = LogisticRegression(C=1.0, max_iter=1000).fit(normalise(support.numpy()), labels.numpy())
    np.testing.assert_allclose(scores.exp().numpy(), reference.predict_proba(normalise(queries.numpy())), atol=1e-5)
    assert (scores.argmax(1) == torch.arange(5).repeat_interleave(4)).float().mean() > 0.9
    with pytest.raises(ValueError, match="every label"):
        head.fit(support[:6], labels[:6], 5)


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, real_omniglot_root: Path, real_cache_dir: Path) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(DATA_ENV, str(real_omniglot_root))
    monkeypatch.setenv(CACHE_ENV, str(real_cache_dir))
    return tmp_path


def head_accuracies(run_dir: Path, episodes: int) -> dict[str, list[float]]:
    """Per-episode 5-way 1-shot test accuracies of both heads on the run's backbone, from their definitions: the
    nearest class mean by Euclidean distance, and scikit-learn's logistic regression on L2-normalised features."""
    record = load_run(run_dir)
    test_set = load_split(record.config.dataset, "test", record.config.protocol, None, record.config.image_size)
    learner = build_learner(record.config, test_set.image_shape)
    learner.load_state_dict(record.model_state)
    backbone = learner.backbone.eval()
    manifest = select_manifest(EvalRequest(run_dir, shots=1, episodes=episodes), record.config, test_set)
    unit = lambda x: F.normalize(x, dim=1).double().numpy()  # noqa: E731
    accuracies: dict[str, list[float]] = {"prototype": [], "logreg": []}
    for index in range(len(manifest)):
        episode = materialise(test_set, manifest.episode(index))
        with torch.no_grad():  # support and queries apart: a MAML backbone normalises with each batch's statistics
            support, queries = backbone(episode.support_images), backbone(episode.query_images)
        means = torch.stack([support[episode.support_labels == label].mean(0) for label in range(episode.ways)])
        classifier = LogisticRegression(C=1.0, max_iter=1000).fit(unit(support), episode.support_labels.numpy())
        for head, predicted in (
            ("prototype", torch.cdist(queries, means).argmin(1)),
            ("logreg", torch.from_numpy(classifier.predict(unit(queries)))),
        ):
            accuracies[head].append(float((predicted == episode.query_labels).float().mean()))
    return accuracies


def assert_scored_as_defined(run_dir: Path, board: pd.DataFrame) -> None:
    """Each evaluation's per-episode accuracies are its head's: the same answers to the 75 queries of every
    episode, but for at most one in all (a float near-tie)."""
    reference = head_accuracies(run_dir, int(board["episodes"].iloc[0]))
    for _, row in board.iterrows():
        scored = pd.read_csv(run_dir / "eval" / f"{row['manifest']}-{row['eval_head']}.csv")["acc"].to_numpy()
        differing = 75 * np.abs(scored - np.array(reference[row["eval_head"]])).sum()
        assert differing < 1.5, f"{row['eval_head']} head: {differing:.0f} answers differ from its definition"


@pytest.mark.real_data
def test_exemplar_run_evaluates_with_both_heads_and_initialises_protonet_and_maml(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pretrain = ["train", "--method", "exemplar", "--surrogate-classes", "32", "--samples-per-class", "4",
                "--surrogate-batch", "32", "--episodes", "6", "--val-every", "3", "--val-episodes", "10",
                "--run-dir", "runs/ex", "--no-progress"]  # fmt: skip
    assert run(pretrain) == 0
    for head in ("prototype", "logreg"):
        assert run(["eval", "--run-dir", "runs/ex", "--shots", "1", "--episodes", "20", "--head", head, "--no-progress"]) == 0
    assert "(logreg head)" in capsys.readouterr().out
    board = leaderboard.read(workdir / "leaderboard.csv")
    assert board["eval_head"].tolist() == ["prototype", "logreg"] and set(board["method"]) == {"exemplar"}
    # 6 pretraining iterations learn nothing measurable (no accuracy floor here): the check is that each head
    # scored the episodes as it is defined
    assert_scored_as_defined(workdir / "runs/ex", board)
    assert (workdir / "runs/ex/eval").is_dir() and len(list((workdir / "runs/ex/eval").glob("*-logreg.csv"))) == 1

    statistics = ("running_mean", "running_var", "num_batches_tracked")  # a training forward moves these
    pretrained = {
        k: v for k, v in load_checkpoint(workdir / "runs/ex" / BEST)["model"].items()
        if k.startswith("backbone.") and not k.endswith(statistics)
    }  # fmt: skip
    # one Adam step of 1e-12 moves no weight visibly: the fine-tuned run starts from the pretrained backbone
    assert run(["train", "--init", "runs/ex", "--ways", "5", "--shots", "1", "--episodes", "1", "--lr", "1e-12",
                "--val-episodes", "10", "--run-dir", "runs/ft", "--no-progress"]) == 0  # fmt: skip
    tuned = load_checkpoint(workdir / "runs/ft" / BEST)["model"]
    for key, value in pretrained.items():
        torch.testing.assert_close(tuned[key], value, atol=1e-9, rtol=0, msg=key)

    # MAML takes the same backbone (BatchNorm running statistics stay behind: MAML uses batch statistics)
    (workdir / "maml.yaml").write_text("method: maml\nconv4_downsample: maxpool\nways: 5\nshots: 1\n")
    assert run(["train", "--config", "maml.yaml", "--init", "runs/ex", "--episodes", "1", "--meta-batch", "1",
                "--lr", "1e-12", "--val-episodes", "5", "--run-dir", "runs/maml", "--no-progress"]) == 0  # fmt: skip
    adapted = load_checkpoint(workdir / "runs/maml" / BEST)["model"]
    for key, value in pretrained.items():
        torch.testing.assert_close(adapted[key], value, atol=1e-9, rtol=0, msg=key)
    # the logreg head also scores a MAML run (episode by episode: its BatchNorm uses batch statistics)
    assert run(["eval", "--run-dir", "runs/maml", "--shots", "1", "--episodes", "10", "--head", "logreg",
                "--leaderboard", "maml.csv", "--no-progress"]) == 0  # fmt: skip
    maml_board = leaderboard.read(workdir / "maml.csv")
    maml_row = maml_board.iloc[0]
    assert (maml_row["method"], maml_row["eval_head"], maml_row["ways"]) == ("maml", "logreg", 5)
    assert_scored_as_defined(workdir / "runs/maml", maml_board)

    # a backbone of another kind is refused with a one-line error, exit 2
    assert run(["train", "--init", "runs/ex", "--backbone", "nsl-conv4", "--episodes", "1", "--run-dir", "runs/bad", "--no-progress"]) == 2
    assert "does not fit this run's" in capsys.readouterr().err

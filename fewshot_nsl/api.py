"""The Python API for what users do outside the CLI: score their own images with a trained run.

    from fewshot_nsl.api import load_trained

    run = load_trained("runs/p1")                     # learner in eval mode + its preprocessing
    support = run.images(["cat1.jpg", "dog1.jpg"])   # decoded, resized, normalised like the data
    run.learner.fit(support, torch.tensor([0, 1]), ways=2)
    probabilities = run.learner(run.images(["query.jpg"])).softmax(-1)

``ways`` is any number for ProtoNet; a MAML learner with a learned head scores exactly the ways
it was trained with. ``load_trained`` rebuilds the model the run's config describes, loads the checkpoint (refusing
one trained as another model, and anything but plain weights), and folds static NSL into plain
convolutions for learners that do not adapt their backbone, as ``fewshot-nsl eval`` does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from fewshot_nsl.config import RunConfig
from fewshot_nsl.data.preprocess import ImageSource, Preprocess
from fewshot_nsl.data.registry import DATASETS, dataset_spec
from fewshot_nsl.engine.checkpoint import load_run, trained_learner
from fewshot_nsl.engine.evaluator import for_inference
from fewshot_nsl.errors import UserError
from fewshot_nsl.learners import FewShotLearner
from fewshot_nsl.runtime import resolve_device


@dataclass(frozen=True)
class TrainedRun:
    """A trained learner (eval mode, on ``device``) and the preprocessing of the data it was trained on."""

    config: RunConfig
    learner: FewShotLearner
    preprocess: Preprocess
    device: torch.device

    def images(self, sources: list[ImageSource]) -> torch.Tensor:
        """Files or uint8 (C, H, W) tensors → the float batch the learner expects, on its device."""
        return self.preprocess(sources).to(self.device)


def load_trained(run_dir: str | os.PathLike, checkpoint: str = "best", device: str = "auto") -> TrainedRun:
    """The learner of a finished run directory (``checkpoint``: ``best`` or ``last``), ready to score."""
    record = load_run(Path(run_dir).expanduser(), checkpoint)
    config = record.config
    shape = record.image_shape
    if shape is None:  # a checkpoint from before image shapes were recorded
        image_size = config.image_size or dataset_spec(config.dataset).image_size
        shape = (_channels_of(record.model_state), image_size, image_size)
    learner = trained_learner(record, Path(run_dir), shape)
    target = resolve_device(device)
    learner = for_inference(learner).to(target).eval()
    dataset = config.dataset if config.dataset in DATASETS else "folder"
    return TrainedRun(config, learner, Preprocess(dataset, shape[1], shape[0]), target)


def _channels_of(state: dict[str, torch.Tensor]) -> int:
    """Input channels of a checkpoint without a recorded image shape: its first 4-D weight's second axis
    (the first convolution: parameters are stored in the order the backbone builds them)."""
    first = next((t for t in state.values() if t.dim() == 4), None)
    if first is None:
        raise UserError("this checkpoint has no convolution weights to tell its input channels; retrain it")
    return int(first.shape[1])

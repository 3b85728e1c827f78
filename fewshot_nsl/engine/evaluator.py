"""Evaluation over fixed episodes: accuracy per episode, mean and 95% CI, leaderboard row."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm import tqdm

import fewshot_nsl
from fewshot_nsl.backbones import parameter_count, resolve_similarity
from fewshot_nsl.config import RunConfig
from fewshot_nsl.data.dataset import ImageClassSet
from fewshot_nsl.data.registry import dataset_spec, load_split
from fewshot_nsl.engine.checkpoint import load_run, trained_learner, write_text_atomically
from fewshot_nsl.engine.distributed import SINGLE, World, gather_in_order, joined, shard
from fewshot_nsl.episodes.episode import image_indices, materialise
from fewshot_nsl.episodes.manifest import Manifest, ManifestSpec, draw, stored_manifest
from fewshot_nsl.episodes.sampler import check_task_fits
from fewshot_nsl.errors import UserError
from fewshot_nsl.learners import FewShotLearner, recipe_columns
from fewshot_nsl.learners.base import EmbeddingLearner
from fewshot_nsl.learners.logreg import with_head
from fewshot_nsl.nsl import fold_static_nsl
from fewshot_nsl.results import leaderboard
from fewshot_nsl.results.provenance import provenance, source_state
from fewshot_nsl.results.stats import Summary, confidence_interval
from fewshot_nsl.runtime import memory_format, resolve_device


EMBED_BATCH = 512


def evaluate_learner(
    learner: FewShotLearner,
    dataset: ImageClassSet,
    manifest: Manifest,
    device: torch.device,
    layout: torch.memory_format = torch.contiguous_format,
    progress: bool = True,
    per_episode: bool = False,
    world: World = SINGLE,
) -> tuple[Summary, list[float]]:
    """Accuracy on every episode of ``manifest``.

    A learner that embeds images independently (``EmbeddingLearner``: ProtoNet) has every image the
    manifest uses embedded once and each episode scored from those embeddings; others (MAML, which
    adapts its backbone per episode), or ``per_episode=True``, go episode by episode through the
    two-phase interface. Both give the same per-episode accuracies (tested).

    Under torchrun (``world``), each rank scores a contiguous shard of the episodes and every rank
    gets all accuracies back in manifest order, so the mean and CI are those of one process.
    """
    manifest.check_dataset(dataset)
    was_training = learner.training
    learner.eval()
    mine = shard(len(manifest), world)
    with torch.no_grad():
        if isinstance(learner, EmbeddingLearner) and not per_episode:
            accuracies = _accuracies_from_embeddings(learner, dataset, manifest, mine, device, layout, progress)
        else:
            accuracies = []
            for index in tqdm(mine, disable=not progress, desc="eval", unit="ep", dynamic_ncols=True):
                episode = materialise(dataset, manifest.episode(index)).to(device, layout)
                logits = learner.fit(episode.support_images, episode.support_labels, episode.ways)(episode.query_images)
                accuracies.append(float((logits.argmax(-1) == episode.query_labels).float().mean()))
    learner.train(was_training)
    accuracies = gather_in_order(accuracies, world)
    return confidence_interval(accuracies), accuracies


def _accuracies_from_embeddings(
    learner: EmbeddingLearner,
    dataset: ImageClassSet,
    manifest: Manifest,
    indices: range,
    device: torch.device,
    layout: torch.memory_format,
    progress: bool,
) -> list[float]:
    episodes = [manifest.episode(index) for index in indices]
    if not episodes:
        return []
    positions = [image_indices(dataset, episode) for episode in episodes]
    used = torch.unique(torch.cat([torch.cat(pair) for pair in positions]))
    row = torch.full((len(dataset.images),), -1, dtype=torch.long)
    row[used] = torch.arange(len(used))
    chunks = []
    for start in tqdm(range(0, len(used), EMBED_BATCH), disable=not progress, desc="embed", unit="batch", dynamic_ncols=True):
        images = dataset.to_float(dataset.images[used[start : start + EMBED_BATCH]])
        chunks.append(learner.embed(images.to(device, memory_format=layout)))
    embeddings = torch.cat(chunks)
    accuracies = []
    for episode, (support, query) in zip(episodes, positions):
        labels = torch.arange(episode.ways, device=device)
        support_labels, query_labels = labels.repeat_interleave(episode.shots), labels.repeat_interleave(episode.queries)
        logits = learner.score_embedded(embeddings[row[support]], support_labels, episode.ways, embeddings[row[query]])
        accuracies.append(float((logits.argmax(-1) == query_labels).float().mean()))
    return accuracies


@dataclass(frozen=True)
class EvalRequest:
    run_dir: Path
    ways: int | None = None
    shots: int | None = None
    queries: int | None = None
    episodes: int | None = None
    leaderboard: Path = Path("leaderboard.csv")
    data_root: str | None = None
    device: str = "auto"
    checkpoint: str = "best"
    manifest: Path | None = None
    progress: bool = True
    head: str | None = None  # None: the learner's own scoring; "prototype" or "logreg" (fewshot_nsl.learners.logreg)


def fixed_ways(config: RunConfig) -> int | None:
    """The only ways a trained learner can score (MAML's learned head), else ``None``."""
    return config.ways if (config.method == "maml" and config.head == "learned") else None


TASK_FLAGS = {"ways": 2, "shots": 1, "queries": 1, "episodes": 1}  # EvalRequest fields and their lowest value


def check_request(request: EvalRequest) -> None:
    """Refuse, before anything is loaded, task counts no episode can have and task flags that an explicit
    manifest (which fixes the episodes) would silently override."""
    given = [f"--{name}" for name in TASK_FLAGS if getattr(request, name) is not None]
    if request.manifest is not None and given:
        raise UserError(f"--manifest fixes the episodes and their task; drop {', '.join(given)}")
    for name, low in TASK_FLAGS.items():
        value = getattr(request, name)
        if value is not None and value < low:
            raise UserError(f"--{name} must be >= {low}, got {value}; give {low} or more, or drop it for the default")
    if request.checkpoint not in ("best", "last"):
        raise UserError(f"checkpoint must be 'best' or 'last', got {request.checkpoint!r}")


def _given(value: int | None, default: int) -> int:
    """A requested count, else the default (a count of 0 is refused by ``check_request``, never replaced)."""
    return default if value is None else value


def select_manifest(request: EvalRequest, config: RunConfig, test_set: ImageClassSet) -> Manifest:
    """An explicit manifest, else the standard one for this task, else episodes drawn now with seed 0."""
    own_ways = fixed_ways(config) if request.head is None else None  # another head scores any number of ways
    if request.manifest is not None:
        manifest = Manifest.load(request.manifest)
        _check_own_ways(own_ways, manifest.spec.ways, "use a manifest of its ways", config.per_step_bn)
        return manifest
    spec = dataset_spec(config.dataset)
    ways = _given(request.ways, _given(own_ways, spec.eval_ways))
    _check_own_ways(own_ways, ways, "drop --ways", config.per_step_bn)
    wanted = ManifestSpec(
        Path(config.dataset).name, config.protocol, "test", ways,
        _given(request.shots, config.shots), _given(request.queries, spec.eval_queries),
        _given(request.episodes, spec.eval_episodes),
    )  # fmt: skip
    check_task_fits(test_set, wanted.ways, wanted.shots, wanted.queries)
    stored = stored_manifest(wanted, test_set)
    return stored if stored is not None else draw(wanted, test_set)


def _check_own_ways(own_ways: int | None, ways: int, fix: str, per_step_bn: bool) -> None:
    """A learned MAML head scores exactly the ways it was trained for: other ways are refused before any episode.
    Another head can score any ways, except over MAML++'s per-step BatchNorm (``with_head`` refuses it)."""
    if own_ways is not None and ways != own_ways:
        other_head = "" if per_step_bn else f", or score {ways} ways with --head prototype or --head logreg on its backbone"
        raise UserError(f"this MAML run's learned head scores {own_ways}-way episodes only, not {ways}-way: {fix}{other_head}")


def for_inference(learner: FewShotLearner) -> FewShotLearner:
    """Static NSL folded into plain convolutions (zero inference overhead), unless
    the learner adapts its backbone per episode: MAML's inner loop updates M too,
    and folding would change what it adapts."""
    return learner if learner.adapts_backbone else fold_static_nsl(learner)


def evaluate_run(request: EvalRequest, report: Callable[[Summary, dict], None] | None = None) -> tuple[Summary, dict]:
    """Evaluate a trained run on fixed test episodes and append the result to the leaderboard.

    The leaderboard is checked before the evaluation starts, and ``report`` (rank 0) gets the result
    before it is appended, so a failing append can neither waste the evaluation nor hide its result.
    Under torchrun the ranks share the episodes (``evaluate_learner``) and rank 0 alone writes the
    per-episode file and the leaderboard row; every rank returns the same summary and row.
    """
    check_request(request)
    leaderboard.check_appendable(request.leaderboard)
    with joined(resolve_device(request.device)) as (world, device):
        summary, row = _evaluate_run(request, world, device)
        if world.is_main:
            if report is not None:
                report(summary, row)
            leaderboard.append(request.leaderboard, row)
        return summary, row


def per_episode_path(request: EvalRequest, manifest: Manifest) -> Path:
    """Where an evaluation's per-episode accuracies go: one file per manifest, head and checkpoint
    (the best checkpoint's keeps the name it always had)."""
    suffix = (f"-{request.head}" if request.head else "") + ("" if request.checkpoint == "best" else f"-{request.checkpoint}")
    return request.run_dir / "eval" / f"{manifest.spec.name}{suffix}.csv"


def _evaluate_run(request: EvalRequest, world: World, device: torch.device) -> tuple[Summary, dict]:
    record = load_run(request.run_dir, request.checkpoint)
    config, train_summary = record.config, record.summary
    layout = memory_format(bool(config.channels_last))
    test_set = load_split(config.dataset, "test", config.protocol, request.data_root or config.data_root, config.image_size)
    manifest = select_manifest(request, config, test_set)
    learner = trained_learner(record, request.run_dir, test_set.image_shape)
    parameters = parameter_count(learner)
    learner = for_inference(learner).to(device, memory_format=layout)
    scorer = with_head(learner, request.head)
    # A replaced head over a backbone that normalises with batch statistics (MAML) embeds episode by episode.
    by_episode = scorer is not learner and not isinstance(learner, EmbeddingLearner)
    summary, accuracies = evaluate_learner(
        scorer, test_set, manifest, device, layout, request.progress and world.is_main, by_episode, world=world
    )
    if world.is_main:
        per_episode = per_episode_path(request, manifest)
        per_episode.parent.mkdir(exist_ok=True)
        text = io.StringIO(newline="")
        csv.writer(text).writerows([("episode", "acc"), *enumerate(accuracies)])
        write_text_atomically(per_episode, text.getvalue())
    similarity = resolve_similarity(config.backbone, config.similarity, config.nsl_form, config.nsl_hidden)
    commit, dirty = source_state()
    train_sessions = train_summary.get("train_sessions")
    row = {
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "method": config.method, "backbone": config.backbone, "similarity": similarity.label,
        "dataset": config.dataset, "protocol": config.protocol, "ways": manifest.spec.ways,
        "shots": manifest.spec.shots, "queries": manifest.spec.queries, "episodes": len(manifest),
        "acc": round(summary.mean, 6), "ci95": round(summary.ci95, 6), "manifest": manifest.spec.name,
        "manifest_hash": manifest.content_hash(), "parameters": parameters,
        "train_episodes": train_summary.get("iterations"), "train_seconds": train_summary.get("train_seconds"),
        "seed": config.seed, "version": fewshot_nsl.__version__, "git_commit": commit, "git_dirty": dirty,
        "train_commits": " ".join(train_sessions) if train_sessions else None,
        "provenance": provenance(dirty, train_sessions), "run_dir": str(request.run_dir), **recipe_columns(config),
        "eval_head": request.head or "own", "eval_checkpoint": request.checkpoint,
    }  # fmt: skip
    return summary, row

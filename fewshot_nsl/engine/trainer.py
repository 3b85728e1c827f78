"""Episodic training: sample, score through the learner interface, step, validate, checkpoint."""

from __future__ import annotations

import csv
import io
import math
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from fewshot_nsl.backbones import parameter_count
from fewshot_nsl.config import RunConfig
from fewshot_nsl.data.augment import Augmentation
from fewshot_nsl.data.dataset import ImageClassSet, union
from fewshot_nsl.data.registry import dataset_spec, load_split, resolve_protocol
from fewshot_nsl.data.seeds import hashed_seed
from fewshot_nsl.data.surrogate import ExemplarTransforms, SurrogateSampler, unlabelled
from fewshot_nsl.engine.checkpoint import (
    BEST,
    CONFIG_FILE,
    LAST,
    METRICS_FILE,
    SUMMARY_FILE,
    checkpoint_metadata,
    load_checkpoint,
    load_run,
    prepare_run_dir,
    random_state,
    read_config,
    read_summary,
    restore_random_state,
    save_atomically,
    write_summary,
    write_text_atomically,
)
from fewshot_nsl.engine.distributed import (
    World,
    all_gather_objects,
    average_buffers,
    data_parallel,
    joined,
    mean_over_ranks,
    rank_seed,
)
from fewshot_nsl.engine.evaluator import evaluate_learner
from fewshot_nsl.episodes.manifest import Manifest, ManifestSpec, draw
from fewshot_nsl.episodes.sampler import EpisodeSampler, check_task_fits
from fewshot_nsl.errors import Interrupted, UserError
from fewshot_nsl.learners import FewShotLearner, build_learner
from fewshot_nsl.results.provenance import session_label
from fewshot_nsl.runtime import memory_format, resolve_device, seeded

LOG_EVERY = 50
METRICS_HEADER = ["iteration", "split", "loss", "acc", "ci95", "lr", "seconds"]


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    iterations: int
    seconds: float
    best_val_acc: float | None


def regularisation(learner: FewShotLearner) -> torch.Tensor | float:
    """Sum of the penalties layers ask for (e.g. full static NSL pulls M toward I)."""
    return sum(
        (m.regularization_loss() for m in learner.modules() if hasattr(m, "regularization_loss")), start=0.0
    )


def learning_rate_schedule(optimizer: torch.optim.Optimizer, config: RunConfig) -> torch.optim.lr_scheduler.LRScheduler:
    """The meta learning-rate schedule, stepped once per iteration.

    ``step``: times ``lr_gamma`` every ``lr_step`` iterations (Snell et al.);
    ``cosine``: from ``lr`` down to ``min_lr`` over the run (MAML++'s CA);
    ``constant``: Finn et al.'s MAML.
    """
    if config.lr_schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.lr_step, gamma=config.lr_gamma)
    if config.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.episodes, eta_min=config.min_lr)
    return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)


def optimiser(learner: FewShotLearner, config: RunConfig) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """Adam over every learner parameter and its learning-rate schedule."""
    optimizer = torch.optim.Adam(learner.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    return optimizer, learning_rate_schedule(optimizer, config)


def default_run_dir(config: RunConfig) -> Path:
    similarity = config.similarity or ("static" if config.backbone.startswith("nsl-") else "conv")
    return Path("runs") / f"{config.method}-{config.backbone}-{similarity}-{Path(config.dataset).name}-seed{config.seed}"


@dataclass
class _Progress:
    """What the loop carries from one iteration to the next (saved in ``last.pt``)."""

    iteration: int = 0
    best_acc: float | None = None
    seconds: float = 0.0
    window_loss: list[float] = field(default_factory=list)
    window_acc: list[float] = field(default_factory=list)
    skipped_nonfinite: int = 0
    sessions: list[str] = field(default_factory=list)  # the code of each training session (start, resumes)


@dataclass(frozen=True)
class _Data:
    train_set: ImageClassSet
    val_set: ImageClassSet | None
    val_manifest: Manifest | None


def train(config: RunConfig, overwrite: bool = False, progress: bool = True, resume_stopped: bool = False) -> TrainResult:
    """Train a learner as ``config`` says and leave a complete run directory.

    Under ``torchrun`` every rank calls this; they train one model together (``engine.distributed``)
    and rank 0 alone writes the run directory. ``resume_stopped``: if the run directory holds a
    stopped run of this same config, continue it instead (what a restart by ``torchrun
    --max-restarts`` needs, since it repeats the original command).
    """
    config = config.resolve()
    device = resolve_device(config.device)  # a device that is not there fails before any data is read
    run_dir = Path(config.run_dir) if config.run_dir else default_run_dir(config)
    config = config.updated({"protocol": resolve_protocol(config.dataset, config.protocol), "run_dir": str(run_dir)})
    if resume_stopped and (run_dir / CONFIG_FILE).exists():
        if read_config(run_dir) != config:
            raise UserError(f"{run_dir} holds a run of another config; give another --run-dir")
        if (run_dir / SUMMARY_FILE).exists():  # finished before the restart
            summary = read_summary(run_dir)
            return TrainResult(run_dir, summary["iterations"], summary["train_seconds"], summary["best_val_acc"])
        if (run_dir / LAST).exists():
            return resume(run_dir, progress)
        overwrite = True  # stopped before its first checkpoint: start it again
    with joined(device) as (world, device):
        data = _load_data(config)
        _check_trainable(config, data.train_set.image_shape)
        moved = _on_main(world, lambda: prepare_run_dir(run_dir, config, overwrite))
        if moved is not None and progress and world.is_main:
            print(f"--overwrite: the previous run in {run_dir} was moved to {moved}")
        return _run(config, run_dir, data, None, progress, world, device)


def _check_trainable(config: RunConfig, image_shape: tuple[int, int, int]) -> None:
    """Build what ``_run`` builds before its first step (learner, ``--init`` backbone, optimiser, schedule) and
    throw it away: a setting that cannot train fails here, before the run directory is touched, so it neither
    moves a finished run aside (``--overwrite``) nor leaves a stub that refuses the corrected command.
    Built in a forked generator state, it changes no random draw of the run itself."""
    with seeded(config.seed):
        learner = build_learner(config, image_shape)
    if config.init is not None:
        _initialise_backbone(learner, Path(config.init))
    optimiser(learner, config)


def _on_main(world: World, action: Any) -> Any:
    """Run ``action`` on rank 0; if it raises, every rank raises too (none waits for it forever)."""
    result, error = None, None
    if world.is_main:
        try:
            result = action()
        except Exception as raised:  # noqa: BLE001 - re-raised below on every rank
            error = raised
    failures = [e for e in all_gather_objects(None if error is None else (type(error) is UserError, str(error)), world) if e]
    if error is not None:
        raise error
    if failures:
        user_error, message = failures[0]
        raise UserError(message) if user_error else RuntimeError(f"rank 0 failed: {message}")
    return result


def train_command(arguments: str, world: World) -> str:
    """``fewshot-nsl train`` with ``arguments``, as it must be launched (under torchrun, as many processes)."""
    if world.distributed:
        return f"torchrun --nproc_per_node={world.size} -m fewshot_nsl train {arguments}"
    return f"fewshot-nsl train {arguments}"


def resume_command(run_dir: Path, world: World) -> str:
    """The command that continues a stopped run."""
    return train_command(f"--resume {run_dir}", world)


def resume(run_dir: Path, progress: bool = True) -> TrainResult:
    """Continue an interrupted run from its ``last.pt``, exactly as if it had never stopped
    (under ``torchrun``, with as many processes as it was trained with)."""
    config = read_config(run_dir)
    if not (run_dir / LAST).exists():
        raise UserError(
            f"{run_dir} has no {LAST} to resume from (it stopped before its first checkpoint); start it again with "
            f"`fewshot-nsl train --config {run_dir / CONFIG_FILE} --overwrite`"
        )
    if (run_dir / SUMMARY_FILE).exists():
        raise UserError(f"{run_dir} is a finished run ({SUMMARY_FILE} exists); nothing to resume")
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(
            f"{run_dir} trains on {config.device} and no CUDA device is available here: resume it where one is, or set "
            f"`device: cpu` in {run_dir / CONFIG_FILE} to continue on CPU (then not bitwise as on the GPU)"
        )
    state = load_checkpoint(run_dir / LAST)
    if "optimizer" not in state:
        raise UserError(f"{run_dir / LAST} holds no training state (written by an older version); it cannot be resumed")
    with joined(resolve_device(config.device)) as (world, device):
        trained_with = state.get("world_size", 1)
        if trained_with != world.size:
            raise UserError(
                f"{run_dir} was trained by {trained_with} process(es) and this resume has {world.size}: resume it "
                + (f"with `torchrun --nproc_per_node={trained_with} -m fewshot_nsl train --resume {run_dir}`"
                   if trained_with > 1 else f"without torchrun: `fewshot-nsl train --resume {run_dir}`")
            )  # fmt: skip
        return _run(config, run_dir, _load_data(config), state, progress, world, device)


def _load_data(config: RunConfig) -> _Data:
    protocol = config.protocol
    spec = dataset_spec(config.dataset)
    train_set = load_split(config.dataset, "train", protocol, config.data_root, config.image_size)
    val_set = None
    if protocol != "lake":
        val_set = load_split(config.dataset, "val", protocol, config.data_root, config.image_size)
    if config.train_on_val:
        if val_set is None:
            raise UserError(f"--train-on-val: the {protocol} protocol of {config.dataset} has no val split")
        train_set, val_set = union(train_set, val_set), None
    if config.method != "exemplar":  # exemplar training draws no episodes from the training split
        check_task_fits(train_set, config.ways, config.shots, config.queries)
    val_spec = ManifestSpec(
        config.dataset, protocol, "val", spec.eval_ways if config.val_ways is None else config.val_ways,
        config.shots if config.val_shots is None else config.val_shots,
        spec.eval_queries if config.val_queries is None else config.val_queries, config.val_episodes, seed=config.seed,
    )  # fmt: skip
    if val_set is None:
        return _Data(train_set, None, None)
    check_task_fits(val_set, val_spec.ways, val_spec.shots, val_spec.queries, option_prefix="val-")
    return _Data(train_set, val_set, draw(val_spec, val_set))


def _sampler(config: RunConfig, train_set: ImageClassSet, world: World) -> EpisodeSampler | SurrogateSampler:
    """What a training step draws: episodes, or for exemplar training surrogate-class batches made from
    the training images alone (``unlabelled``: the labels are dropped before the sampler sees the split)."""
    generator = torch.Generator().manual_seed(rank_seed(config.seed, world.rank))
    if config.method == "exemplar":
        return SurrogateSampler(
            unlabelled(train_set), config.surrogate_classes, config.samples_per_class, config.surrogate_batch,
            ExemplarTransforms.from_mapping(config.exemplar_transforms), config.seed, generator,
        )  # fmt: skip
    return EpisodeSampler(train_set, config.ways, config.shots, config.queries, generator, *_augmentation(config, world.rank))


# Buffers a backbone trained with running BatchNorm statistics has and MAML's (batch statistics only) lacks.
RUNNING_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


def _initialise_backbone(learner: FewShotLearner, init_dir: Path) -> None:
    """Copy the backbone of the run in ``init_dir`` (its best checkpoint) into ``learner``'s backbone.

    Only the backbone moves (an exemplar run's surrogate classifier or a MAML head stay behind); every
    backbone parameter must be found with its shape, or this is an error naming the mismatch.
    """
    record = load_run(init_dir, "best")
    prefix = "backbone."
    weights = {k.removeprefix(prefix): v for k, v in record.model_state.items() if k.startswith(prefix)}
    own = learner.backbone.state_dict()
    missing = sorted(set(own) - set(weights))
    extra = sorted(k for k in set(weights) - set(own) if not k.endswith(RUNNING_STATISTICS))
    wrong = sorted(k for k in set(own) & set(weights) if own[k].shape != weights[k].shape)
    if missing or extra or wrong:
        detail = "; ".join(
            f"{what}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
            for what, keys in (("missing", missing), ("unexpected", extra), ("other shape", wrong)) if keys
        )  # fmt: skip
        raise UserError(
            f"--init {init_dir}: its backbone ({record.config.backbone}, {record.config.similarity or 'conv'}) does not "
            f"fit this run's ({detail}); pretrain with the same --backbone, --similarity, --nsl-*, --width and conv4_downsample"
        )
    learner.backbone.load_state_dict({k: weights[k] for k in own})


def _run(
    config: RunConfig, run_dir: Path, data: _Data, state: dict | None, progress: bool, world: World, device: torch.device
) -> TrainResult:
    progress = progress and world.is_main
    dropblock = _dropblock_generator(config, world.rank)
    with seeded(config.seed):
        learner = build_learner(config, data.train_set.image_shape, dropblock)
    if state is None and config.init is not None:
        _initialise_backbone(learner, Path(config.init))
    layout = memory_format(bool(config.channels_last))
    learner.to(device, memory_format=layout)
    optimizer, schedule = optimiser(learner, config)
    sampler = _sampler(config, data.train_set, world)
    generators = {"sampler": sampler.generator}
    if getattr(sampler, "augmentation_generator", None) is not None:
        generators["augmentation"] = sampler.augmentation_generator
    if config.drop_rate > 0:
        generators["dropblock"] = dropblock
    done = _Progress()
    if state is not None:
        learner.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        restore_random_state(state["random_ranks"][world.rank] if world.distributed else state["random"], generators)
        done = _Progress(**state["progress"])
        done.best_acc = _best_so_far(run_dir, done.best_acc)
        if world.is_main:
            _truncate_metrics(run_dir / METRICS_FILE, done.iteration)
    objective, unsynced = data_parallel(learner, world)
    saved_at = None if state is None else done.iteration  # the iteration last.pt holds

    def checkpoint() -> None:
        nonlocal saved_at
        ranks = all_gather_objects(random_state(generators), world)  # every rank's draws, to resume them all
        saved_at = done.iteration
        if not world.is_main:
            return
        save_atomically(
            {"model": learner.state_dict(), "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
             "random": ranks[0], "progress": asdict(done), **checkpoint_metadata(config, data.train_set.image_shape),
             **({"random_ranks": ranks, "world_size": world.size} if world.distributed else {})},
            run_dir / LAST,
        )  # fmt: skip

    done.sessions.append(session_label())  # this session: the start, or a resume
    started = time.perf_counter() - done.seconds
    fresh = state is None
    metrics_path = run_dir / METRICS_FILE if world.is_main else Path(os.devnull)  # rank 0 alone writes files
    with open(metrics_path, "w" if fresh else "a", newline="") as handle, _StopSignals() as stop:
        metrics = csv.writer(handle)
        if fresh:
            metrics.writerow(METRICS_HEADER)
            handle.flush()
        bar = tqdm(
            range(done.iteration + 1, config.episodes + 1), disable=not progress, desc="train", unit="it",
            dynamic_ncols=True, initial=done.iteration, total=config.episodes,
        )  # fmt: skip
        for iteration in bar:
            learner.train()
            learner.set_iteration(iteration - 1)
            batch = [sampler.sample().to(device, layout) for _ in range(config.meta_batch)]
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.amp):
                result = learner.backward_batch(batch, objective, unsynced)
            penalty = regularisation(learner)
            # e.g. full static NSL's pull toward I: a function of the parameters alone, the same on every rank,
            # so its gradient needs no averaging (under torchrun it is added after DDP's reduction).
            if isinstance(penalty, torch.Tensor) and penalty.requires_grad:
                penalty.backward()
            # Every rank takes the same decisions (step or skip, stop): from numbers averaged over ranks.
            loss, accuracy, stopping = mean_over_ranks([result.loss.item(), result.accuracy, float(bool(stop.received))], world)
            average_buffers(learner, world)  # the forward updated each rank's running statistics
            if math.isfinite(loss):
                optimizer.step()
            elif config.skip_nonfinite:
                done.skipped_nonfinite += 1
            else:
                kept = f"{run_dir / LAST} keeps the last checkpoint (iteration {saved_at})" if saved_at is not None else f"no {LAST} was saved yet"
                raise UserError(
                    f"the training loss became {loss} at iteration {iteration}; stopped before applying it ({kept}). Start "
                    f"again with a lower --lr, `{train_command(f'--config {run_dir / CONFIG_FILE} --lr LOWER --overwrite', world)}` "
                    f"(moves this run aside), or add --skip-nonfinite to skip and count such batches"
                )
            schedule.step()
            done.iteration = iteration
            if math.isfinite(loss):
                done.window_loss.append(loss)
                done.window_acc.append(accuracy)
            if (iteration % LOG_EVERY == 0 or iteration == config.episodes) and done.window_loss:
                mean_loss = sum(done.window_loss) / len(done.window_loss)
                mean_acc = sum(done.window_acc) / len(done.window_acc)
                metrics.writerow([iteration, "train", f"{mean_loss:.5f}", f"{mean_acc:.5f}", "", f"{schedule.get_last_lr()[0]:.3g}", f"{time.perf_counter() - started:.1f}"])
                handle.flush()
                bar.set_postfix(loss=f"{mean_loss:.3f}", acc=f"{100 * mean_acc:.1f}")
                done.window_loss, done.window_acc = [], []
            if data.val_manifest is not None and (iteration % config.val_every == 0 or iteration == config.episodes):
                summary, _ = evaluate_learner(
                    learner, data.val_set, data.val_manifest, device, layout, progress=False, world=world
                )
                metrics.writerow([iteration, "val", "", f"{summary.mean:.5f}", f"{summary.ci95:.5f}", "", f"{time.perf_counter() - started:.1f}"])
                handle.flush()
                if done.best_acc is None or summary.mean > done.best_acc:
                    done.best_acc = summary.mean
                    if world.is_main:
                        save_atomically({"model": learner.state_dict(), "iteration": iteration, "val_acc": done.best_acc,
                                     **checkpoint_metadata(config, data.train_set.image_shape)}, run_dir / BEST)  # fmt: skip
                if world.is_main:
                    bar.write(f"iteration {iteration}: val {summary}" + (" (best)" if done.best_acc == summary.mean else ""))
            done.seconds = time.perf_counter() - started
            if iteration % config.checkpoint_every == 0 or iteration == config.episodes:
                checkpoint()
            if stopping:
                checkpoint()
                raise Interrupted(
                    f"stopped by {stop.received or 'a signal to another rank'} at iteration {iteration} of {config.episodes}; the state is saved in "
                    f"{run_dir / LAST}: continue with `{resume_command(run_dir, world)}`"
                )
    if not world.is_main:
        return TrainResult(run_dir, config.episodes, done.seconds, done.best_acc)
    if data.val_manifest is None:
        save_atomically({"model": learner.state_dict(), "iteration": config.episodes, "val_acc": None,
                         **checkpoint_metadata(config, data.train_set.image_shape)}, run_dir / BEST)  # fmt: skip
    write_summary(
        run_dir,
        {"iterations": config.episodes, "train_seconds": round(done.seconds, 1), "best_val_acc": done.best_acc,
         "skipped_nonfinite": done.skipped_nonfinite, "parameters": parameter_count(learner), "device": str(device),
         "train_sessions": done.sessions},
    )  # fmt: skip
    return TrainResult(run_dir, config.episodes, done.seconds, done.best_acc)


def _augmentation(config: RunConfig, rank: int) -> tuple[Augmentation | None, torch.Generator | None]:
    """The training augmentation and its own generator (seeded from ``seed + 1`` and the rank, so turning
    augmentation on leaves the sampler's episodes unchanged), or ``(None, None)``."""
    if not config.augment:
        return None, None
    augmentation = Augmentation(config.augment_crop_scale, config.augment_jitter, config.augment_flip)
    return augmentation, torch.Generator().manual_seed(rank_seed(config.seed + 1, rank))


def _best_so_far(run_dir: Path, recorded: float | None) -> float | None:
    """The validation accuracy a resumed run must beat: ``best.pt`` can be newer than ``last.pt`` (saved after
    its checkpoint, before the stop), and a worse model must not replace it."""
    saved = load_checkpoint(run_dir / BEST).get("val_acc") if (run_dir / BEST).exists() else None
    return max((acc for acc in (recorded, saved) if acc is not None), default=None)


def _dropblock_generator(config: RunConfig, rank: int) -> torch.Generator:
    """The generator DropBlock's masks are drawn from: seeded from the run's seed and the rank (each rank
    of a torchrun job drops its own blocks, as it draws its own episodes), by its own hash, so its
    stream is unrelated to any run's episodes or augmentation."""
    return torch.Generator().manual_seed(hashed_seed("fewshot-nsl dropblock", config.seed, rank))


def _truncate_metrics(path: Path, iteration: int) -> None:
    """Drop metric rows logged after the checkpoint a resumed run restarts from (and any torn last line),
    rewriting the file atomically: a crash here leaves the old rows, never a cut file."""
    rows = []
    if path.exists():
        with open(path, newline="") as handle:
            rows = [row for row in csv.reader(handle) if len(row) == len(METRICS_HEADER)]
    body = [row for row in rows[1:] if row[0].isdigit() and int(row[0]) <= iteration]
    text = io.StringIO(newline="")
    csv.writer(text).writerows([METRICS_HEADER, *body])
    write_text_atomically(path, text.getvalue())


class _StopSignals:
    """Turns SIGINT/SIGTERM into a flag the loop checks after each iteration (main thread only)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_StopSignals":
        if threading.current_thread() is threading.main_thread():
            for number in self.SIGNALS:
                self._previous[number] = signal.signal(number, self._note)
        return self

    def _note(self, number: int, frame: object) -> None:
        self.received = signal.Signals(number).name

    def __exit__(self, *exc: object) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)

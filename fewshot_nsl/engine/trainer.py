"""Episodic training: sample, score through the learner interface, step, validate, checkpoint."""

from __future__ import annotations

import csv
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from fewshot_nsl.backbones import parameter_count
from fewshot_nsl.config import RunConfig
from fewshot_nsl.data.dataset import union
from fewshot_nsl.data.registry import dataset_spec, load_split, resolve_protocol
from fewshot_nsl.engine.checkpoint import BEST, LAST, METRICS_FILE, prepare_run_dir, save_atomically, write_summary
from fewshot_nsl.engine.evaluator import evaluate_learner
from fewshot_nsl.episodes.manifest import ManifestSpec, draw
from fewshot_nsl.episodes.sampler import EpisodeSampler, check_task_fits
from fewshot_nsl.errors import UserError
from fewshot_nsl.learners import FewShotLearner, build_learner
from fewshot_nsl.runtime import memory_format, resolve_device, seeded

LOG_EVERY = 50


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


def default_run_dir(config: RunConfig) -> Path:
    similarity = config.similarity or ("static" if config.backbone.startswith("nsl-") else "conv")
    return Path("runs") / f"{config.method}-{config.backbone}-{similarity}-{Path(config.dataset).name}-seed{config.seed}"


def train(config: RunConfig, overwrite: bool = False, progress: bool = True) -> TrainResult:
    """Train a learner as ``config`` says and leave a complete run directory."""
    config = config.resolve()
    device = resolve_device(config.device)
    protocol = resolve_protocol(config.dataset, config.protocol)
    run_dir = Path(config.run_dir) if config.run_dir else default_run_dir(config)
    config = config.updated({"protocol": protocol, "run_dir": str(run_dir)})
    spec = dataset_spec(config.dataset)

    train_set = load_split(config.dataset, "train", protocol, config.data_root, config.image_size)
    val_set = None
    if protocol != "lake":
        val_set = load_split(config.dataset, "val", protocol, config.data_root, config.image_size)
    if config.train_on_val:
        if val_set is None:
            raise UserError(f"--train-on-val: the {protocol} protocol of {config.dataset} has no val split")
        train_set, val_set = union(train_set, val_set), None
    check_task_fits(train_set, config.ways, config.shots, config.queries)
    val_spec = ManifestSpec(
        config.dataset, protocol, "val", config.val_ways or spec.eval_ways, config.val_shots or config.shots,
        spec.eval_queries, config.val_episodes, seed=config.seed,
    )  # fmt: skip
    val_manifest = draw(val_spec, val_set) if val_set is not None else None
    prepare_run_dir(run_dir, config, overwrite)

    with seeded(config.seed):
        learner = build_learner(config, train_set.image_shape)
    layout = memory_format(bool(config.channels_last))
    learner.to(device, memory_format=layout)
    optimizer = torch.optim.Adam(learner.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = learning_rate_schedule(optimizer, config)
    sampler = EpisodeSampler(train_set, config.ways, config.shots, config.queries, torch.Generator().manual_seed(config.seed))

    best_acc: float | None = None
    started = time.perf_counter()
    window_loss, window_acc = [], []
    with open(run_dir / METRICS_FILE, "w", newline="") as handle:
        metrics = csv.writer(handle)
        metrics.writerow(["iteration", "split", "loss", "acc", "ci95", "lr", "seconds"])
        bar = tqdm(range(1, config.episodes + 1), disable=not progress, desc="train", unit="it", dynamic_ncols=True)
        for iteration in bar:
            learner.train()
            learner.set_iteration(iteration - 1)
            batch = [sampler.sample().to(device, layout) for _ in range(config.meta_batch)]
            optimizer.zero_grad(set_to_none=True)
            result = learner.backward_batch(batch)
            penalty = regularisation(learner)
            if isinstance(penalty, torch.Tensor):
                penalty.backward()
            optimizer.step()
            schedule.step()
            window_loss.append(result.loss.item())
            window_acc.append(result.accuracy)
            if iteration % LOG_EVERY == 0 or iteration == config.episodes:
                loss, acc = sum(window_loss) / len(window_loss), sum(window_acc) / len(window_acc)
                metrics.writerow([iteration, "train", f"{loss:.5f}", f"{acc:.5f}", "", f"{schedule.get_last_lr()[0]:.3g}", f"{time.perf_counter() - started:.1f}"])
                handle.flush()
                bar.set_postfix(loss=f"{loss:.3f}", acc=f"{100 * acc:.1f}")
                window_loss, window_acc = [], []
            if val_manifest is not None and (iteration % config.val_every == 0 or iteration == config.episodes):
                summary, _ = evaluate_learner(learner, val_set, val_manifest, device, layout, progress=False)
                metrics.writerow([iteration, "val", "", f"{summary.mean:.5f}", f"{summary.ci95:.5f}", "", f"{time.perf_counter() - started:.1f}"])
                if best_acc is None or summary.mean > best_acc:
                    best_acc = summary.mean
                    save_atomically({"model": learner.state_dict(), "iteration": iteration, "val_acc": best_acc}, run_dir / BEST)
                bar.write(f"iteration {iteration}: val {summary}" + (" (best)" if best_acc == summary.mean else ""))
    seconds = time.perf_counter() - started
    save_atomically({"model": learner.state_dict(), "iteration": config.episodes, "val_acc": None}, run_dir / LAST)
    if val_manifest is None:
        save_atomically({"model": learner.state_dict(), "iteration": config.episodes, "val_acc": None}, run_dir / BEST)
    write_summary(
        run_dir,
        {"iterations": config.episodes, "train_seconds": round(seconds, 1), "best_val_acc": best_acc,
         "parameters": parameter_count(learner), "device": str(device)},
    )  # fmt: skip
    return TrainResult(run_dir, config.episodes, seconds, best_acc)

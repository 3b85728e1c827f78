"""Several processes training one model, started by ``torchrun`` (PyTorch's own launcher).

``torchrun --nproc_per_node=N -m fewshot_nsl train ...`` starts N copies of the
command with ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set; :func:`joined` turns
them into a process group (``gloo`` on CPU, ``nccl`` on GPUs) and a
:class:`World`. A plain ``fewshot-nsl train`` is a world of one, and every
helper here is then a no-op, so single-process runs are unchanged.

What N ranks compute: each rank draws its own episodes (its generator is
seeded by :func:`rank_seed` from the run's seed and its rank; rank 0's is the
single-process generator), scores ``meta_batch`` of them and backpropagates
through :func:`data_parallel`'s ``DistributedDataParallel`` wrapper, which
averages the gradients over ranks during the backward; so every rank takes the
optimiser step of the mean loss over ``N * meta_batch`` episodes: the
computation of one process with meta-batch ``N * meta_batch`` fed the same
episodes (tested with two CPU processes). DDP wraps the learner's
``batch_loss`` (:class:`MetaBatchObjective`), not its two-phase ``fit`` /
``forward``, because that is the one forward whose backward trains it; a
learner that backpropagates a meta-batch task by task (sequential MAML) runs
all tasks but the last under DDP's ``no_sync``, DDP's own gradient accumulation.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fewshot_nsl.data.seeds import hashed_seed
from fewshot_nsl.episodes.episode import Episode
from fewshot_nsl.errors import UserError
from fewshot_nsl.learners.base import BatchResult, FewShotLearner

# A collective that waits longer than this on a rank that stopped answering fails instead of hanging;
# torchrun normally ends the job first, as soon as it sees a worker exit.
COLLECTIVE_TIMEOUT = timedelta(minutes=10)


# DDP warns when a gradient's strides differ from its bucket's, which copies the parameter's. A
# kernel with one input channel (the stem on Omniglot) is contiguous and channels_last at once:
# oneDNN's convolution hands it a gradient in one of the two stride sets, a reshape (static NSL's
# fold, dynamic NSL's planes path) in the other. They differ only on that size-1 dimension, the
# memory order is the same and the copy a plain one, so that case alone is silenced.
AMBIGUOUS_STRIDES_WARNING = r"(?s)Grad strides do not match bucket view strides.*grad\.sizes\(\) = \[\d+, 1, \d+, \d+\]"


@dataclass(frozen=True)
class World:
    """This process's place among the ranks of a run (a world of one when not launched by torchrun)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes checkpoints, metrics, summaries and leaderboard rows, and prints progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


SINGLE = World()


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_main_process() -> bool:
    """Rank 0 of a torchrun job, or a process not launched by torchrun (what the CLI prints from)."""
    return int(os.environ.get("RANK", "0")) == 0


@contextlib.contextmanager
def joined(device: torch.device) -> Iterator[tuple[World, torch.device]]:
    """Join the process group torchrun set up (if any) for the block; yields the world and this rank's device.

    The backend follows the device: ``nccl`` for CUDA (each rank on GPU ``LOCAL_RANK``), ``gloo`` on CPU.
    """
    if not launched_by_torchrun() or dist.is_initialized():
        yield current_world(), device
        return
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserError(
                f"rank with LOCAL_RANK {local_rank} has no GPU (this node has {torch.cuda.device_count()}); "
                "lower torchrun's --nproc_per_node to the number of GPUs"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=COLLECTIVE_TIMEOUT)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=AMBIGUOUS_STRIDES_WARNING)
            yield current_world(), device
    finally:
        dist.destroy_process_group()


def current_world() -> World:
    if not dist.is_initialized():
        return SINGLE
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def rank_seed(seed: int, rank: int) -> int:
    """The episode seed of ``rank``: ``seed`` itself for rank 0 (so one process samples as before),
    else 63 bits of SHA-256 of ``(seed, rank)``, unrelated to any other rank's or run's seed."""
    return seed if rank == 0 else hashed_seed("fewshot-nsl episodes", seed, rank)


class MetaBatchObjective(nn.Module):
    """A learner's ``batch_loss`` as a module's forward, the form ``DistributedDataParallel`` wraps."""

    def __init__(self, learner: FewShotLearner):
        super().__init__()
        self.learner = learner

    def forward(self, episodes: Sequence[Episode]) -> BatchResult:
        return self.learner.batch_loss(episodes)


def data_parallel(
    learner: FewShotLearner, world: World
) -> tuple[Callable[[Sequence[Episode]], BatchResult] | None, Callable[[], contextlib.AbstractContextManager]]:
    """The ``objective`` and ``unsynced`` arguments of ``learner.backward_batch`` for this world.

    A world of one: ``(None, nullcontext)``, the learner's own ``batch_loss``. Under torchrun: a
    ``DistributedDataParallel`` around the learner (built after it is on its device and loaded; DDP
    then checks every rank holds parameters of the same shapes and copies rank 0's values) and its
    ``no_sync``. Buffers are not synced from rank 0 at each forward: BatchNorm statistics are
    averaged over ranks instead (:func:`average_buffers`). A parameter that gets no gradient makes
    DDP fail loudly (no ``find_unused_parameters``): every learner here uses all it trains.
    """
    if not world.distributed:
        return None, contextlib.nullcontext
    wrapped = DistributedDataParallel(MetaBatchObjective(learner), forward_sync_buffers=False)
    return wrapped, wrapped.no_sync


def average_buffers(module: nn.Module, world: World) -> None:
    """Average floating-point buffers (BatchNorm running statistics) over ranks, so every rank and the
    checkpoint carry statistics of all ranks' episodes rather than rank 0's alone."""
    if world.distributed:
        _average_in_place([b for b in module.buffers() if b.is_floating_point()], world)


def _average_in_place(tensors: list[torch.Tensor], world: World) -> None:
    """Each tensor becomes its mean over ranks: one all-reduce of them flattened together."""
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= world.size
    offset = 0
    for tensor in tensors:
        tensor.copy_(flat[offset : offset + tensor.numel()].view_as(tensor))
        offset += tensor.numel()


def mean_over_ranks(values: Sequence[float], world: World) -> list[float]:
    """Element-wise mean of a few numbers (a logged loss and accuracy) over ranks."""
    if not world.distributed:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(tensor)
    return (tensor / world.size).tolist()


def _collective_device() -> torch.device:
    """Where small tensors for a collective must live: nccl reduces CUDA tensors only."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def gather_in_order(items: list, world: World) -> list:
    """Concatenate every rank's list, rank 0's first (each rank holds a contiguous shard)."""
    return [item for part in all_gather_objects(items, world) for item in part]


def all_gather_objects(item: object, world: World) -> list:
    """One picklable object from every rank, in rank order."""
    if not world.distributed:
        return [item]
    gathered: list = [None] * world.size
    dist.all_gather_object(gathered, item)
    return gathered


def shard(count: int, world: World) -> range:
    """The contiguous slice of ``range(count)`` this rank handles (sizes differ by at most one)."""
    start = world.rank * count // world.size
    return range(start, (world.rank + 1) * count // world.size)

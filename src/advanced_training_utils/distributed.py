"""Rank awareness in one place: environment detection, DDP, sharded loaders, reductions.

``train_model_advanced`` asks this module three kinds of question and nothing else about ranks:

* setup: :func:`setup` reads torchrun's environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``,
  ``MASTER_ADDR``...), initialises the process group when the caller has not (gloo on CPU, nccl
  on CUDA, with a finite timeout so a dead rank ends the job instead of hanging it), and picks
  ``cuda:LOCAL_RANK`` on GPUs;
* data and model: :meth:`DistContext.wrap` puts the model in ``DistributedDataParallel``;
  :meth:`DistContext.shard` rebuilds a map-style ``DataLoader`` around a ``DistributedSampler``
  (the loader's ``batch_size`` is per process and its shuffle setting is kept);
* agreement: :meth:`DistContext.sum_` / :meth:`DistContext.max_` all-reduce device tensors
  (asynchronous collectives: no host read), :meth:`DistContext.any_host` agrees on a host flag
  over a CPU (gloo) group, :meth:`DistContext.gather_object` collects per-rank state for
  checkpoints, and :attr:`DistContext.is_main` says whether this rank writes files.

With one process (no torchrun), :func:`setup` returns a context whose methods are no-ops.
FSDP is not supported yet.
"""

from __future__ import annotations

import datetime
import gc
import logging
import os
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, RandomSampler

__all__ = ["DistContext", "setup", "env_world_size"]

log = logging.getLogger(__name__)


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 when not launched by torchrun)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


class DistContext:
    """What the training loop needs to know about the other processes."""

    def __init__(self, world_size: int = 1, rank: int = 0, local_rank: int = 0,
                 initialized_here: bool = False) -> None:
        self.world_size, self.rank, self.local_rank = world_size, rank, local_rank
        self.initialized_here = initialized_here
        self._host_group: Any = None
        if self.enabled:
            # Host-side flags (preemption) agree over gloo, so CUDA runs need no device sync.
            self._host_group = (dist.new_group(backend="gloo")
                                if dist.get_backend() != "gloo" else dist.group.WORLD)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, requested: torch.device) -> torch.device:
        """On CUDA each rank uses ``cuda:LOCAL_RANK``."""
        if self.enabled and requested.type == "cuda":
            torch.cuda.set_device(self.local_rank)
            return torch.device("cuda", self.local_rank)
        return requested

    # ---------------------------------------------------------------- model and data
    def wrap(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """``DistributedDataParallel(model)`` when distributed, else ``model``."""
        if not self.enabled:
            return model
        ids = [device.index] if device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def shard(self, loader: Iterable[Any], seed: int, train: bool) -> Iterable[Any]:
        """A map-style DataLoader rebuilt with a DistributedSampler; others unchanged."""
        if not self.enabled or not isinstance(loader, DataLoader):
            if self.enabled:
                log.warning("rank %d: %s loader is not a DataLoader; every rank sees all of it",
                            self.rank, "train" if train else "val")
            return loader
        if isinstance(loader.dataset, IterableDataset) or loader.batch_size is None:
            log.warning("rank %d: iterable-style or unbatched loader left unsharded", self.rank)
            return loader
        if isinstance(loader.sampler, DistributedSampler):
            return loader
        shuffle = isinstance(loader.sampler, RandomSampler)
        sampler = DistributedSampler(loader.dataset, num_replicas=self.world_size, rank=self.rank,
                                     shuffle=shuffle, seed=seed, drop_last=False)
        kw: dict[str, Any] = dict(
            batch_size=loader.batch_size, sampler=sampler, num_workers=loader.num_workers,
            collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, drop_last=loader.drop_last,
            timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
            multiprocessing_context=loader.multiprocessing_context, generator=loader.generator,
            persistent_workers=loader.persistent_workers)
        if loader.num_workers > 0:
            kw["prefetch_factor"] = loader.prefetch_factor
        return DataLoader(loader.dataset, **kw)

    # ---------------------------------------------------------------- agreement
    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """In-place all-reduce SUM (a device collective; no host read)."""
        if self.enabled:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def max_(self, t: torch.Tensor) -> torch.Tensor:
        """In-place all-reduce MAX."""
        if self.enabled:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t

    def any_host(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is True on any rank (CPU collective)."""
        if not self.enabled:
            return flag
        t = torch.tensor([1.0 if flag else 0.0])
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._host_group)
        return bool(t.item() > 0)

    def gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (rank order), on every rank."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self._host_group)
        return out

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier(group=self._host_group)

    def abort(self) -> None:
        """After an error on this rank: destroy the process group without waiting for others."""
        if self.initialized_here and dist.is_initialized():
            gc.collect()
            dist.destroy_process_group()

    def teardown(self) -> None:
        """Destroy the process group if :func:`setup` created it (after a barrier, so no rank
        tears down while another still has a collective in flight)."""
        if self.initialized_here and dist.is_initialized():
            # Free the DDP wrapper (and its reducer, which holds the process group) first:
            # a reducer outliving the group aborts the process at exit.
            gc.collect()
            try:
                dist.barrier()
            finally:
                dist.destroy_process_group()


def setup(device: torch.device, timeout_s: float = 60.0) -> DistContext:
    """Detect torchrun's environment and initialise the process group if needed.

    Returns a one-process context when ``WORLD_SIZE`` is unset or 1.
    """
    world = env_world_size()
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_world_size(), dist.get_rank(),
                           int(os.environ.get("LOCAL_RANK", "0")))
    if world <= 1:
        return DistContext()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local)
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    log.info("rank %d/%d initialised (%s, local rank %d)", rank, world, backend, local)
    return DistContext(world, rank, local, initialized_here=True)

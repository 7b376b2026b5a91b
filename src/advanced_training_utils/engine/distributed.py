"""Rank awareness in one place: environment detection, DDP, sharded loaders, reductions.

``train_model_advanced`` asks this module three kinds of question and nothing else about ranks:

* setup: :func:`setup` reads torchrun's environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``,
  ``MASTER_ADDR``...), initialises the process group when the caller has not (gloo on CPU, nccl
  on CUDA, with a finite timeout so a dead rank ends the job instead of hanging it), and picks
  ``cuda:LOCAL_RANK`` on GPUs;
* data and model: :meth:`DistContext.wrap` puts the model in ``DistributedDataParallel``;
  :meth:`DistContext.shard` rebuilds a map-style ``DataLoader`` so that each rank loads its share
  (the loader's ``batch_size`` is per process); :meth:`DistContext.sync_buffers` gives every rank
  rank 0's buffers before evaluation (what DDP's forward does before each training step);
* agreement: :meth:`DistContext.sum_` / :meth:`DistContext.max_` all-reduce device tensors
  (asynchronous collectives: no host read), :meth:`DistContext.any_host` agrees on a host flag
  over a CPU (gloo) group, :meth:`DistContext.gather_object` collects per-rank state for
  checkpoints, and :attr:`DistContext.is_main` says whether this rank writes files.

With one process (no torchrun), :func:`setup` returns a context whose methods are no-ops.
FSDP is not supported yet.

How a loader is sharded (:meth:`DistContext.shard`):

* a plain ``shuffle=True``/``shuffle=False`` training loader (``RandomSampler`` without
  replacement or ``num_samples``, ``SequentialSampler``) gets a ``DistributedSampler`` over the
  dataset, seeded with ``seed`` and the epoch (``set_epoch``), padded so every rank has as many
  items;
* any other sampler (``SubsetRandomSampler``, ``WeightedRandomSampler``, a ``RandomSampler``
  with replacement, your own) and any custom ``batch_sampler`` is wrapped in
  :class:`ShardedSampler`: every epoch each rank draws the sampler's whole sequence with the same
  seed (``seed + epoch``), pads it by repeating its start to a multiple of the world size, and
  takes every ``world_size``-th item from its rank on (items are indices, or whole batches for a
  batch sampler). The union of the ranks' items is the sampler's own draw: a subset split trains
  on its subset only, and weights keep their effect;
* a validation loader is split the same way but without padding (ranks may get unequal shares:
  evaluation has no gradient all-reduce), so each validation item is counted exactly once.

How a wrapped sampler gets the same draws on every rank: while it is drawn, the global torch
(CPU), Python ``random`` and NumPy RNGs are seeded with ``seed + epoch`` and restored afterwards
(training's own random stream is not advanced), and a sampler with a ``generator`` attribute (all
of torch's random samplers) draws from a fresh ``torch.Generator`` seeded with ``seed + epoch``
instead of its own (which is put back, unadvanced). A sampler with another private RNG must be
seeded identically on every rank by its owner; the ranks compare a digest of each epoch's draw and
raise ``ValueError`` when they differ, instead of training on overlapping shards. Because the
draw is a function of the epoch, a mid-epoch resume regenerates each rank's order
(:mod:`.dataorder`). A sampler with ``set_epoch`` also receives the epoch.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import hashlib
import logging
import math
import os
import random
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
)

__all__ = ["DistContext", "ShardedSampler", "setup", "env_world_size", "order_is_per_epoch"]

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
        """This rank's share of a map-style DataLoader (see the module docstring); other
        iterables, iterable-style datasets and unbatched loaders are returned unchanged.

        Args:
            loader: the user's loader.
            seed: the shared seed; epoch ``e`` draws with ``seed + e``.
            train: True pads so every rank gets as many items (the gradient all-reduce needs
                equal step counts); False splits without padding (each item counted once).
        """
        if not self.enabled:
            return loader
        what = "train" if train else "val"
        if not isinstance(loader, DataLoader):
            log.warning("rank %d: %s loader is not a DataLoader; every rank sees all of it",
                        self.rank, what)
            return loader
        if isinstance(loader.dataset, IterableDataset) or loader.batch_sampler is None:
            log.warning("rank %d: iterable-style or unbatched loader left unsharded", self.rank)
            return loader
        if isinstance(loader.sampler, DistributedSampler) or isinstance(
                loader.batch_sampler, ShardedSampler):
            return loader
        share = dict(num_replicas=self.world_size, rank=self.rank, seed=seed, even=train,
                     agree=self.gather_object, name=f"{what}_loader")
        if type(loader.batch_sampler) is not BatchSampler:  # the user's own batch sampler
            return _rebuild(loader, batch_sampler=ShardedSampler(
                loader.batch_sampler, batches=True, **share))
        bs = loader.batch_sampler  # torch's own: wraps the sampler (from batch_size= or not)
        s = bs.sampler
        if train and (type(s) is SequentialSampler or (
                type(s) is RandomSampler and not s.replacement
                and getattr(s, "_num_samples", None) is None)):
            sampler: Sampler[Any] = DistributedSampler(
                loader.dataset, num_replicas=self.world_size, rank=self.rank,
                shuffle=type(s) is RandomSampler, seed=seed, drop_last=False)
        else:
            sampler = ShardedSampler(s, **share)
        return _rebuild(loader, sampler=sampler, batch_size=bs.batch_size, drop_last=bs.drop_last)

    def sync_buffers(self, module: torch.nn.Module) -> None:
        """Broadcast rank 0's buffers (BatchNorm statistics...) to every rank, as DDP does before
        each training forward; evaluation then runs on the unwrapped module with no collective
        per batch (validation shards may differ in length)."""
        if self.enabled:
            for b in module.buffers():
                dist.broadcast(b, src=0)

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


def _rebuild(loader: DataLoader, **sampling: Any) -> DataLoader:
    """``loader`` over the same dataset and with the same options, but new sampling."""
    kw: dict[str, Any] = dict(
        num_workers=loader.num_workers, collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory, timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context, generator=loader.generator,
        persistent_workers=loader.persistent_workers, **sampling)
    if loader.num_workers > 0:
        kw["prefetch_factor"] = loader.prefetch_factor
    return DataLoader(loader.dataset, **kw)


@contextlib.contextmanager
def _seeded(sampler: Any, seed: int) -> Iterator[None]:
    """Seed every RNG a sampler may draw from with ``seed``; restore them all afterwards."""
    np = sys.modules.get("numpy")
    py_state, np_state = random.getstate(), np.random.get_state() if np else None
    own = getattr(sampler, "generator", None)
    with torch.random.fork_rng(devices=[]):  # the CPU generator only: CUDA streams untouched
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        if np is not None:
            np.random.seed(seed % 2**32)
        swapped = False
        if hasattr(sampler, "generator"):
            try:
                sampler.generator = torch.Generator().manual_seed(seed)
                swapped = True
            except AttributeError:  # read-only: the ranks' digests tell if that matters
                pass
        try:
            yield
        finally:
            if swapped:
                sampler.generator = own
            random.setstate(py_state)
            if np is not None:
                np.random.set_state(np_state)


class ShardedSampler(Sampler[Any]):
    """This rank's share of another sampler's draws; every rank draws the same sequence.

    Per epoch: draw ``inner``'s whole sequence with every RNG seeded from ``seed + epoch`` (see
    the module docstring), then with ``even=True`` pad it by repeating its start to a multiple of
    ``num_replicas`` (``DistributedSampler``'s rule) and take ``items[rank::num_replicas]``; with
    ``even=False`` take ``items[rank::num_replicas]`` unpadded.

    Args:
        inner: a sampler of indices, or a batch sampler with ``batches=True`` (each rank then
            takes whole batches of it).
        num_replicas, rank: the world size and this rank.
        seed: the shared seed.
        even: pad so that every rank has ``ceil(len(inner) / num_replicas)`` items.
        batches: ``inner`` yields lists of indices.
        agree: ``gather_object`` of the process group; when given, the ranks compare a digest of
            each draw and raise ``ValueError`` if it differs.
        name: the argument named in that error.

    Example::

        >>> s = ShardedSampler(range(5), num_replicas=2, rank=1)
        >>> list(s)
        [1, 3, 0]
    """

    def __init__(self, inner: Iterable[Any], num_replicas: int, rank: int, seed: int = 0,
                 even: bool = True, batches: bool = False,
                 agree: Callable[[Any], list[Any]] | None = None, name: str = "loader") -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas - 1}], got {rank}")
        self.inner, self.num_replicas, self.rank, self.seed = inner, num_replicas, rank, seed
        self.even, self.batches, self.agree, self.name = even, batches, agree, name
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Draw epoch ``epoch``'s sequence next (forwarded to ``inner`` if it has one)."""
        self.epoch = epoch
        if hasattr(self.inner, "set_epoch"):
            self.inner.set_epoch(epoch)

    def __len__(self) -> int:
        n = len(self.inner)  # type: ignore[arg-type]
        if self.even:
            return math.ceil(n / self.num_replicas)
        return len(range(self.rank, n, self.num_replicas))

    def __iter__(self) -> Iterator[Any]:
        with _seeded(self.inner, self.seed + self.epoch):
            items = [list(b) for b in self.inner] if self.batches else list(self.inner)
        if self.agree is not None:
            digests = self.agree(hashlib.blake2b(repr(items).encode(), digest_size=16).digest())
            if len(set(digests)) > 1:
                raise ValueError(
                    f"{self.name}: its {'batch_' if self.batches else ''}sampler "
                    f"{type(self.inner).__name__} drew a different sequence on each rank in "
                    f"epoch {self.epoch}; under DDP a sampler must draw from the global RNGs or a "
                    "'generator' attribute (both are seeded per epoch), or be seeded the same on "
                    "every rank")
        if self.even and items and len(items) % self.num_replicas:
            pad = self.num_replicas - len(items) % self.num_replicas
            items += (items * math.ceil(pad / len(items)))[:pad]
        return iter(items[self.rank::self.num_replicas])


def order_is_per_epoch(loader: Any) -> bool:
    """True when ``loader``'s order is a function of its epoch on each rank (a
    ``DistributedSampler`` or a :class:`ShardedSampler`): a resume regenerates it."""
    return (isinstance(getattr(loader, "sampler", None), (DistributedSampler, ShardedSampler))
            or isinstance(getattr(loader, "batch_sampler", None), ShardedSampler))


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

"""Make a training loader's batch order recordable and resumable mid-epoch.

A ``DataLoader`` over a map-style dataset is rebuilt around :class:`EpochOrder`, a batch sampler
that wraps the loader's own one. At the start of each epoch it draws the whole epoch's index
batches from the original sampler (the same random draws, at the same moment, as the original
loader would make), remembers them, and yields them. A checkpoint stores that list; on resume the
wrapper yields only the batches after the saved position, so the skipped batches are neither
loaded nor run through the model, and the cost of resuming does not grow with the position.

Other iterables (lists, generators, iterable-style datasets) are used as they are; resuming
mid-epoch then skips the first batches by iterating past them (documented: it loads them).

Under DDP each rank's order is a function of the seed and the epoch (``DistributedSampler`` or
:class:`~.distributed.ShardedSampler`), so a mid-epoch resume regenerates it on each rank
instead of replaying the recorded one (which is rank 0's).

Random state. Each iteration records the RNG state at the moment its iterator is created: the
global RNGs (python, numpy, torch) and every ``torch.Generator`` the loader draws its order
from (``DataLoader(generator=g)``, whose generator also draws each iterator's base seed, and a
``generator`` attribute of its sampler, batch sampler or dataset: ``RandomSampler``,
``SubsetRandomSampler``, ``WeightedRandomSampler``, custom samplers that follow that
convention). A checkpoint stores those generators' states (and, mid-epoch, the state at the
epoch's start). A mid-epoch resume restores the epoch-start state, creates the iterator and
skips to the saved position (so an iterable that reshuffles from the global RNG when its
iteration starts draws the same order), then restores the checkpoint's state. Resuming is then
bit-exact for these loaders. Not recorded: a generator held under another attribute name, an
iterable's private random state, and the random state of DataLoader worker processes for the
batches a mid-epoch resume does not load. An iterable that draws from the global RNG while it
yields batches (not only when its iteration starts) is detected while skipping and logged as a
warning: its draws interleaved with the model's, which a resume cannot replay.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, Sampler

from .. import checkpoint as ck
from .distributed import order_is_per_epoch

__all__ = ["EpochOrder", "ResumableLoader", "find_generators", "make_resumable"]

log = logging.getLogger(__name__)


class EpochOrder(Sampler[list[int]]):
    """A batch sampler that materialises and records each epoch's index batches."""

    def __init__(self, inner: Iterable[list[int]]) -> None:
        self.inner = inner
        self.current: list[list[int]] = []
        self._resume: list[list[int]] | None = None
        self._start = 0

    def __len__(self) -> int:
        return len(self.inner)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[list[int]]:
        if self._resume is not None:
            self.current, self._resume = self._resume, None
            start, self._start = self._start, 0
        else:
            self.current = [list(b) for b in self.inner]
            start = 0
        yield from self.current[start:]

    def resume_at(self, batches: list[list[int]] | None, start: int) -> None:
        """Make the next epoch yield ``batches[start:]`` without drawing a new order; with
        ``batches=None`` regenerate the order (for samplers that draw no global randomness, such
        as ``DistributedSampler``, whose order is fixed by its seed and epoch)."""
        if batches is None:
            batches = [list(b) for b in self.inner]
        self._resume, self._start = batches, start

    def order_state(self) -> dict[str, torch.Tensor]:
        """The current epoch's order as tensors (flat indices and batch sizes)."""
        flat = [i for b in self.current for i in b]
        return {"indices": torch.tensor(flat, dtype=torch.int64),
                "sizes": torch.tensor([len(b) for b in self.current], dtype=torch.int64)}

    @staticmethod
    def order_from_state(state: dict[str, torch.Tensor]) -> list[list[int]]:
        flat = state["indices"].tolist()
        out, at = [], 0
        for n in state["sizes"].tolist():
            out.append(flat[at:at + n])
            at += n
        return out


def find_generators(*loaders: Any) -> list[torch.Generator]:
    """The ``torch.Generator`` objects ``loaders`` draw their order from, each once, in a fixed
    order: a ``generator`` attribute of each loader, of its dataset, and of its sampler and batch
    sampler and the samplers they wrap (``.sampler``, a few levels deep)."""
    found: list[torch.Generator] = []

    def visit(obj: Any, depth: int) -> None:
        if obj is None or depth > 4:
            return
        g = getattr(obj, "generator", None)
        if isinstance(g, torch.Generator) and all(g is not f for f in found):
            found.append(g)
        if depth:  # samplers: follow the wrapped sampler
            visit(getattr(obj, "sampler", None), depth + 1)

    for loader in loaders:
        visit(loader, 0)
        visit(getattr(loader, "dataset", None), 0)
        visit(getattr(loader, "sampler", None), 1)
        visit(getattr(loader, "batch_sampler", None), 1)
    return found


class ResumableLoader:
    """The loader used for training: iterate it once per epoch.

    ``start_epoch_at(order, k, rng)`` makes the next iteration begin at batch ``k`` of a saved
    order, with the random state of the saved run (see the module docstring).

    Args:
        loader: the training loader.
        others: other loaders whose generators a checkpoint records too (the validation loader).
    """

    def __init__(self, loader: Iterable[Any], others: Iterable[Any] = ()) -> None:
        self.original = loader
        self.order: EpochOrder | None = None
        self._plan: tuple[int, dict[str, Any]] | None = None
        self._epoch_start: dict[str, Any] | None = None
        self.loader: Iterable[Any] = loader
        if (isinstance(loader, DataLoader) and not isinstance(loader.dataset, IterableDataset)
                and loader.batch_sampler is not None):
            self.order = EpochOrder(loader.batch_sampler)
            kw: dict[str, Any] = dict(
                batch_sampler=self.order, num_workers=loader.num_workers,
                collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
                timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
                multiprocessing_context=loader.multiprocessing_context,
                generator=loader.generator, persistent_workers=loader.persistent_workers,
            )
            if loader.num_workers > 0:
                kw["prefetch_factor"] = loader.prefetch_factor
            self.loader = DataLoader(loader.dataset, **kw)
        self.generators = find_generators(loader, *[o for o in others if o is not None])

    @property
    def sampler(self) -> Any:
        return getattr(self.original, "sampler", None)

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def set_epoch(self, epoch: int) -> None:
        """Pass the epoch to the loader's sampler and batch sampler, where they take one."""
        seen: list[Any] = []
        for s in (self.sampler, getattr(self.original, "batch_sampler", None)):
            if hasattr(s, "set_epoch") and not any(s is t for t in seen):
                s.set_epoch(epoch)
                seen.append(s)

    def __iter__(self) -> Iterator[Any]:
        plan, self._plan = self._plan, None
        if plan is None:
            self._epoch_start = self.rng_state()
            return iter(self.loader)
        skip, rng = plan
        self._epoch_start = rng.get("epoch_start")
        if self._epoch_start is not None:
            self.load_rng_state(self._epoch_start)
        it = iter(self.loader)
        if skip:
            it = _skip(it, skip)
        self.load_rng_state(rng["now"])
        return it

    def start_epoch_at(self, order: dict[str, torch.Tensor] | None, start: int,
                       rng: dict[str, Any] | None = None) -> None:
        """Begin the next iteration at batch ``start`` of ``order`` (a saved epoch order).

        Args:
            rng: ``{'epoch_start': state or None, 'now': state}``, the :meth:`rng_state` of the
                saved run when its epoch's iterator was created and at the checkpoint. The next
                iteration restores ``epoch_start`` before it creates its iterator and ``now``
                after skipping to ``start``.
        """
        skip = 0
        if self.order is not None and order_is_per_epoch(self.original):
            self.order.resume_at(None, start)  # each rank regenerates its own shard's order
        elif self.order is not None and order is not None:
            self.order.resume_at(EpochOrder.order_from_state(order), start)
        else:
            skip = start
        self._plan = (skip, rng if rng is not None else {"epoch_start": None, "now": None})

    def order_state(self) -> dict[str, torch.Tensor] | None:
        return self.order.order_state() if self.order is not None else None

    # ------------------------------------------------------------------ random state
    def rng_state(self) -> dict[str, Any]:
        """The global RNG states and those of :attr:`generators`, now."""
        return {"global": ck.capture_rng(), "generators": [g.get_state() for g in self.generators]}

    def load_rng_state(self, state: dict[str, Any] | None) -> None:
        """Restore a :meth:`rng_state` (``generators: None``: the global RNGs only).

        Raises:
            ValueError: the state holds a different number of generators than this loader has.
        """
        if state is None:
            return
        if state.get("global") is not None:
            ck.restore_rng(state["global"])
        saved = state.get("generators")
        if saved is None:
            return
        if len(saved) != len(self.generators):
            raise ValueError(
                f"resume: the checkpoint recorded {len(saved)} torch.Generator(s) of the "
                f"loaders (DataLoader/sampler/dataset 'generator'), this run's loaders have "
                f"{len(self.generators)}; resume with the same loaders, or resume=False")
        for g, st in zip(self.generators, saved):
            g.set_state(st)

    def checkpoint_state(self, mid_epoch: bool) -> dict[str, Any]:
        """What a checkpoint stores per rank: the generators' states now and, mid-epoch, the
        :meth:`rng_state` from when this epoch's iterator was created."""
        return {"generators": [g.get_state() for g in self.generators],
                "epoch_start": self._epoch_start if mid_epoch else None}


def _skip(it: Iterator[Any], n: int) -> Iterator[Any]:
    """Consume ``n`` batches of ``it`` now (so that the iterable's own draws happen before the
    caller restores the checkpoint's RNG state); warn if it drew from a global RNG between
    batches, since those draws were interleaved with the model's in the saved run."""
    before = None
    for i in range(n):
        try:
            next(it)
        except StopIteration:
            return iter(())
        if i == 0:
            before = _global_rng_fingerprint()
    if before is not None and n > 1 and before != _global_rng_fingerprint():
        log.warning("resume: train_loader draws random numbers while it yields batches (not "
                    "only when its iteration starts); the resumed epoch replays those draws "
                    "without the model's in between, so it is not bit-exact")
    return it


def _global_rng_fingerprint() -> tuple[Any, ...]:
    """Comparable states of the python, numpy and torch global RNGs."""
    n = np.random.get_state()
    return (random.getstate(), n[1].tobytes(), n[2], bytes(torch.get_rng_state().numpy()))


def make_resumable(loader: Iterable[Any], others: Iterable[Any] = ()) -> ResumableLoader:
    """Wrap ``loader`` for recordable, resumable epochs (see the module docstring)."""
    return ResumableLoader(loader, others)

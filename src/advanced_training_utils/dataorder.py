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
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, Sampler

from .distributed import order_is_per_epoch

__all__ = ["EpochOrder", "ResumableLoader", "make_resumable"]


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


class ResumableLoader:
    """The loader used for training: iterate it once per epoch.

    ``start_epoch_at(order, k)`` makes the next iteration begin at batch ``k`` of a saved order.
    """

    def __init__(self, loader: Iterable[Any]) -> None:
        self.original = loader
        self.order: EpochOrder | None = None
        self._skip = 0
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
        it = iter(self.loader)
        skip, self._skip = self._skip, 0
        return itertools.islice(it, skip, None) if skip else it

    def start_epoch_at(self, order: dict[str, torch.Tensor] | None, start: int) -> None:
        """Begin the next iteration at batch ``start`` of ``order`` (a saved epoch order)."""
        if self.order is not None and order_is_per_epoch(self.original):
            self.order.resume_at(None, start)  # each rank regenerates its own shard's order
        elif self.order is not None and order is not None:
            self.order.resume_at(EpochOrder.order_from_state(order), start)
        else:
            self._skip = start

    def order_state(self) -> dict[str, torch.Tensor] | None:
        return self.order.order_state() if self.order is not None else None


def make_resumable(loader: Iterable[Any]) -> ResumableLoader:
    """Wrap ``loader`` for recordable, resumable epochs (see the module docstring)."""
    return ResumableLoader(loader)

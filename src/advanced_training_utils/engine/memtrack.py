"""Live tensor memory where torch keeps no allocator statistic (the CPU): a dispatch-mode tracker.

:class:`StorageTracker` is a ``TorchDispatchMode``: every aten operator that runs while it is
active passes through it. For each output tensor of an operator whose storage is *new* (not the
storage of one of the operator's inputs: views, in-place and ``out=`` results are not new) on
the tracked device type, it adds the storage's ``nbytes()`` to the live count and registers a
``weakref.finalize`` on the storage that subtracts them again when the storage is freed (torch
keeps one Python object per storage for as long as the storage lives, so the finalizer runs
exactly when the memory is released). The peak is read after every operator, when its outputs
exist and its inputs are still held: that is where an allocator's peak lies too.

What it counts, exactly: the bytes torch requested for tensor storages created while it is
active (autograd's saved tensors and gradients included: the backward pass runs its operators
through the same mode), plus ``base_bytes`` (what already existed: see :func:`storage_bytes`).
What it cannot see: scratch memory allocated *inside* one kernel (a convolution's workspace,
an operator decomposed below the Python dispatch key), the allocator's rounding and caching,
and memory that is not a tensor (the Python objects, the dataset, DataLoader workers). The
batch-size finder's ``headroom`` covers the first two.

With ``budget_bytes``, the tracker raises ``torch.OutOfMemoryError`` as soon as
``(base_bytes + live) * (1 + headroom)`` exceeds the budget, so that a CPU probe fails the way
a GPU probe does and one ``except torch.OutOfMemoryError`` handles both.

Example:
    >>> import torch
    >>> with StorageTracker() as t:
    ...     a = torch.empty(1000)                     # 4000 bytes
    ...     b = torch.empty(500, dtype=torch.float64)  # 4000 bytes
    ...     del a
    ...     c = torch.empty(250)                       # 1000 bytes
    >>> t.peak_bytes, t.live_bytes
    (8000, 5000)
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["StorageTracker", "storage_bytes", "format_bytes"]


class _Count:
    """The live and peak byte counts, shared with the storages' finalizers (which may run
    after the tracker is gone; they then update this small object only)."""

    __slots__ = ("live", "peak")

    def __init__(self) -> None:
        self.live = 0
        self.peak = 0

    def free(self, n: int) -> None:
        self.live -= n


def _storages(obj: Any, device_type: str) -> list[torch.UntypedStorage]:
    return [t.untyped_storage() for t in tree_flatten(obj)[0]
            if isinstance(t, torch.Tensor) and t.device.type == device_type]


class StorageTracker(TorchDispatchMode):
    """Counts the bytes of the tensor storages created while active (see the module docstring).

    Args:
        device_type: the device whose storages are counted (``'cpu'``).
        base_bytes: memory that exists before (the model, its gradients, the optimizer's
            state); added to every reading.
        budget_bytes: raise ``torch.OutOfMemoryError`` once ``(base + live) * (1 + headroom)``
            exceeds it (None: never).
        headroom: the margin kept below the budget, a fraction (0.1: 10 %).

    Attributes read after (or during) the block: :attr:`peak_bytes`, :attr:`live_bytes`
    (both including ``base_bytes``).
    """

    def __init__(self, device_type: str = "cpu", base_bytes: int = 0,
                 budget_bytes: int | None = None, headroom: float = 0.0) -> None:
        super().__init__()
        self.device_type = device_type
        self.base_bytes = int(base_bytes)
        self.budget_bytes = budget_bytes
        self.headroom = float(headroom)
        self._count = _Count()

    @property
    def peak_bytes(self) -> int:
        """The most bytes live at once (``base_bytes`` included)."""
        return self.base_bytes + self._count.peak

    @property
    def live_bytes(self) -> int:
        """The bytes live now (``base_bytes`` included)."""
        return self.base_bytes + self._count.live

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        count = self._count
        inputs = {id(s) for s in _storages((args, kwargs), self.device_type)}
        for s in _storages(out, self.device_type):
            if id(s) in inputs:  # a view, an in-place or an out= result: no new memory
                continue
            inputs.add(id(s))    # one storage returned twice counts once
            n = s.nbytes()
            count.live += n
            weakref.finalize(s, count.free, n)
        if count.live > count.peak:
            count.peak = count.live
            self._check_budget()
        return out

    def _check_budget(self) -> None:
        if self.budget_bytes is None:
            return
        need = self.peak_bytes * (1.0 + self.headroom)
        if need > self.budget_bytes:
            raise torch.OutOfMemoryError(
                f"memory budget exceeded: {format_bytes(self.peak_bytes)} live x (1 + headroom "
                f"{self.headroom:g}) > memory_budget {format_bytes(self.budget_bytes)}")


def storage_bytes(tensors: Iterable[torch.Tensor], device_type: str = "cpu") -> int:
    """The bytes of the distinct storages behind ``tensors`` on ``device_type`` (a storage
    shared by several tensors, e.g. tied weights or views, counts once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type == device_type:
            s = t.untyped_storage()
            seen[id(s)] = s.nbytes()
    return sum(seen.values())


def format_bytes(n: float) -> str:
    """``n`` bytes in binary units: ``'1.50 GiB'``, ``'512 B'``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")

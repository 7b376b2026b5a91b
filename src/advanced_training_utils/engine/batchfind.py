"""The batch-size finder: the largest micro-batch that fits, with the effective batch kept.

:func:`find_batch_size` probes candidate micro-batch sizes with the run's own training step
(:func:`.parts.build_parts` and :func:`.loop.train_epoch`: forward, backward, clipping, the
guard, the optimizer step, in the run's precision, and recovery's snapshot when recovery is on)
and, separately, the run's validation pass (:func:`.loop.evaluate`, under ``no_grad``), on the
*longest* items of the data (largest ``numel`` of the inputs; with a padding ``collate_fn`` a
batch of the longest clips is the largest batch of that size). Sizes double from 2 until one
does not fit, then a binary search between the last fit and the first failure finds the
largest size that fits (sizes assumed monotone: what fits at ``n`` fits below ``n``). The
target size itself is probed first: without accumulation it holds no gradients across
micro-batches, so it may fit where smaller sizes with accumulation do not.

The doubling starts at 2 (1 is probed only when 2 does not fit: batch norm cannot train on one
item).

**What a training probe runs.** Two optimizer steps, so that the second runs with the
optimizer's state (and recovery's snapshot) already there, as every step after the first of a
run does; for a size below the target, each step is a window of two micro-batches, so that the
second micro-batch runs with the first one's gradients held, as accumulation does. A
validation probe runs one training step of two items (gradients, optimizer state and snapshot
exist during a run's validation), then the validation forward of the candidate size.

**Memory.** On CUDA: the allocator's peak (``torch.cuda.max_memory_allocated`` after
``reset_peak_memory_stats``); the budget is, unless given, the device's free memory
(``torch.cuda.mem_get_info``) plus what this process's allocator holds after ``empty_cache``
(the memory our tensors can occupy). Elsewhere (the CPU) torch keeps no allocator statistic:
``memory_budget=`` (bytes) is required, and :class:`.memtrack.StorageTracker` counts the live
tensor storages of the probe exactly (the model's parameters and buffers, then every storage
the step creates, until it is freed). What it covers: the model, its gradients, the optimizer's
state, recovery's snapshot, the batch and every activation and temporary tensor; not the
dataset, the Python process or DataLoader workers, nor scratch memory inside one kernel.

A size fits when its step raises no ``torch.OutOfMemoryError`` and ``peak x (1 + headroom) <=
budget``; on the CPU the tracker raises ``torch.OutOfMemoryError`` itself as soon as the live
bytes break that rule, so one ``except torch.OutOfMemoryError`` (never a string match) handles
both devices. Any other error propagates.

**The effective batch is kept.** The micro-batch is the largest *divisor* of
``target_batch_size`` that fits, and ``accumulation_steps = target // micro`` (so ``micro x
accumulation == target`` exactly: the loop weights micro-batches by examples, so a window's
gradient equals that of one batch of the target size). A target with few divisors (a prime)
may leave a much smaller micro-batch than the largest that fits: a warning says so.

**State.** The model's ``state_dict`` (on the CPU), its gradients and train/eval modes, an
optimizer passed as ``optimizer=`` (its ``state_dict``) and every RNG (python, numpy, torch,
CUDA) are copied before and restored after (``torch.equal``), whatever the probes did.

**Resume.** :meth:`BatchSizeResult.record` is what ``train_model_advanced(...,
batch_size_choice=...)`` stores in the checkpoint's options; :func:`recorded_choice` reads it
back, so a resumed run reuses the choice instead of probing again.

Example:
    >>> import torch
    >>> from torch.utils.data import TensorDataset
    >>> data = TensorDataset(torch.randn(64, 8), torch.randint(0, 2, (64,)))
    >>> model = torch.nn.Linear(8, 2)
    >>> r = find_batch_size(model, data, torch.nn.CrossEntropyLoss(), target_batch_size=32,
    ...                     device="cpu", memory_budget=1 << 30)
    >>> r.micro_batch_size, r.accumulation_steps
    (32, 1)
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import default_collate

from .. import checkpoint as ck
from .._validate import check_int, check_real
from .config import TrainConfig
from .distributed import DistContext
from .loop import evaluate, split_batch, train_epoch
from .memtrack import StorageTracker, format_bytes, storage_bytes
from .parts import build_parts
from .prepare import resolve_device

__all__ = ["Probe", "BatchSizeResult", "find_batch_size", "choose_micro_batch",
           "longest_first", "recorded_choice", "RECORD_KEYS"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Probe:
    """One probed size: ``phase`` ``'train'`` or ``'val'``; ``peak_bytes`` the peak memory of
    the probe (for a size that did not fit: the reading when it failed, a lower bound)."""

    phase: str
    batch_size: int
    peak_bytes: int
    fits: bool


@dataclass
class BatchSizeResult:
    """What :func:`find_batch_size` chose and measured.

    ``micro_batch_size x accumulation_steps == target_batch_size``; ``largest_fitting`` is the
    largest training micro-batch (at most the target) that fits, ``val_batch_size`` the largest
    validation batch (at most ``max_val_batch_size``); ``peak_bytes`` / ``val_peak_bytes`` their
    peaks; ``budget_bytes`` the budget they were held to; ``probes`` every probe, in order.
    """

    micro_batch_size: int
    accumulation_steps: int
    target_batch_size: int
    largest_fitting: int
    val_batch_size: int
    budget_bytes: int
    headroom: float
    peak_bytes: int
    val_peak_bytes: int
    device: str
    probes: list[Probe] = field(default_factory=list)

    def record(self) -> dict[str, Any]:
        """The choice as plain values (``train_model_advanced(batch_size_choice=...)``): every
        field but the probes."""
        return {k: getattr(self, k) for k in RECORD_KEYS}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> BatchSizeResult:
        """The result of a :meth:`record` (no probes: none were run)."""
        return cls(**{k: record[k] for k in RECORD_KEYS})

    def table(self) -> str:
        """The probes as a text table: phase, size, peak memory, fits."""
        rows = [f"{'phase':<6}{'size':>7}{'peak':>14}  fits"]
        rows += [f"{p.phase:<6}{p.batch_size:>7}{format_bytes(p.peak_bytes):>14}  "
                 f"{'yes' if p.fits else 'no'}" for p in self.probes]
        return "\n".join(rows)


#: The keys of :meth:`BatchSizeResult.record`.
RECORD_KEYS = tuple(f.name for f in dataclasses.fields(BatchSizeResult) if f.name != "probes")


def choose_micro_batch(target: int, largest_fitting: int) -> tuple[int, int]:
    """``(micro, accumulation)``: the largest divisor of ``target`` that is at most
    ``largest_fitting``, and ``target // micro``.

    Example:
        >>> choose_micro_batch(64, 40), choose_micro_batch(60, 40), choose_micro_batch(7, 6)
        ((32, 2), (30, 2), (1, 7))
    """
    check_int("target", target, low=1)
    check_int("largest_fitting", largest_fitting, low=1)
    micro = max(d for d in range(1, min(target, largest_fitting) + 1) if target % d == 0)
    return micro, target // micro


def longest_first(dataset: Sequence[Any]) -> list[int]:
    """The dataset's indices, largest inputs first (``numel`` summed over the input's tensors;
    ties in index order). Reads every item once."""
    def size(i: int) -> int:
        x, _ = split_batch(dataset[i])
        leaves = x if isinstance(x, (tuple, list)) else (
            list(x.values()) if isinstance(x, dict) else [x])
        return sum(t.numel() for t in leaves if isinstance(t, torch.Tensor))

    sizes = [size(i) for i in range(len(dataset))]
    return sorted(range(len(sizes)), key=lambda i: (-sizes[i], i))


@dataclass
class _Items:
    """Batches of the longest items of one dataset, collated as the loader would."""

    dataset: Sequence[Any]
    collate: Callable[[list[Any]], Any]
    order: list[int]

    def batch(self, n: int) -> Any:
        """The ``n`` longest items (cycled when the dataset has fewer), collated."""
        return self.collate([self.dataset[self.order[i % len(self.order)]] for i in range(n)])


class _CpuMeter:
    """Peak memory by :class:`StorageTracker` against a given budget (any non-CUDA device)."""

    def __init__(self, device: torch.device, budget: int, headroom: float) -> None:
        self.device_type, self.budget, self.headroom = device.type, budget, headroom
        self.tracker: StorageTracker | None = None

    def measure(self, step: Callable[[], None], resident: Iterable[torch.Tensor]) -> int:
        self.tracker = StorageTracker(self.device_type, storage_bytes(resident, self.device_type),
                                      self.budget, self.headroom)
        with self.tracker:
            step()
        return self.tracker.peak_bytes

    def failed_peak(self) -> int:
        return self.tracker.peak_bytes if self.tracker is not None else 0

    def cleanup(self) -> None:
        """Nothing: garbage left by a probe is outside the next probe's count."""


class _CudaMeter:
    """Peak memory by the CUDA caching allocator's statistics."""

    def __init__(self, device: torch.device, budget: int | None, headroom: float) -> None:
        self.device, self.headroom = device, headroom
        torch.cuda.empty_cache()
        free, _ = torch.cuda.mem_get_info(device)
        self.budget = budget if budget is not None else free + torch.cuda.memory_reserved(device)

    def measure(self, step: Callable[[], None], resident: Iterable[torch.Tensor]) -> int:
        torch.cuda.reset_peak_memory_stats(self.device)
        step()
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        if peak * (1.0 + self.headroom) > self.budget:
            raise torch.OutOfMemoryError(f"peak {format_bytes(peak)} x (1 + headroom "
                                         f"{self.headroom:g}) > budget "
                                         f"{format_bytes(self.budget)}")
        return peak

    def failed_peak(self) -> int:
        return torch.cuda.max_memory_allocated(self.device)

    def cleanup(self) -> None:
        gc.collect()
        torch.cuda.empty_cache()


def _meter(device: torch.device, budget: int | None, headroom: float) -> Any:
    if device.type == "cuda":
        return _CudaMeter(device, budget, headroom)
    if budget is None:
        raise ValueError(f"memory_budget= (bytes) is required on device {str(device)!r}: torch "
                         "keeps no allocator statistic there, so the finder holds the probes to "
                         "a budget you give (e.g. memory_budget=2 * 1024**3)")
    return _CpuMeter(device, budget, headroom)


@contextlib.contextmanager
def _restored(model: torch.nn.Module, optimizer: Any) -> Iterator[None]:
    """Copy the model's state, gradients and modes, an optimizer instance's state and every
    RNG; restore them on exit (the model back on its device)."""
    rng = ck.capture_rng()
    params = list(model.parameters())
    where = params[0].device if params else torch.device("cpu")
    state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    grads = [None if p.grad is None else p.grad.detach().to("cpu", copy=True) for p in params]
    modes = [m.training for m in model.modules()]
    opt = optimizer if isinstance(optimizer, torch.optim.Optimizer) else None
    opt_state = copy.deepcopy(opt.state_dict()) if opt is not None else None
    try:
        yield
    finally:
        model.to(where)
        model.load_state_dict(state)
        for p, g in zip(params, grads):
            p.grad = None if g is None else g.to(p.device)
        for m, mode in zip(model.modules(), modes):
            m.training = mode
        if opt is not None:
            opt.load_state_dict(copy.deepcopy(opt_state))
        ck.restore_rng(rng)


class _Prober:
    """Runs the probes (one run's parts per probe) and keeps the table of results."""

    def __init__(self, model: torch.nn.Module, criterion: Any, cfg: TrainConfig,
                 device: torch.device, meter: Any, train: _Items, val: _Items,
                 target: int) -> None:
        self.model, self.criterion, self.cfg, self.device = model, criterion, cfg, device
        self.meter, self.train_items, self.val_items, self.target = meter, train, val, target
        self.opt = cfg.optimizer if isinstance(cfg.optimizer, torch.optim.Optimizer) else None
        self.opt_state = copy.deepcopy(self.opt.state_dict()) if self.opt is not None else None
        self.probes: list[Probe] = []

    def _parts(self, n_batches: int, accumulation: int) -> Any:
        cfg = dataclasses.replace(self.cfg, accumulation_steps=accumulation)
        return build_parts(self.model, [None] * n_batches, [], self.criterion, cfg, self.device,
                           DistContext())

    def _train_steps(self, parts: Any, size: int, n_batches: int, accumulation: int) -> None:
        def after_step(done: int, sums: Any) -> None:  # the run refreshes its snapshot so
            if done == accumulation:
                parts.monitor.snapshot()

        batches = (self.train_items.batch(size) for _ in range(n_batches))
        train_epoch(parts.steps, batches, n_batches=n_batches, after_step=after_step)

    def train_step(self, size: int) -> None:
        """Two optimizer steps of micro-batches of ``size`` (windows of two below the target)."""
        accumulation = 1 if size >= self.target else 2
        parts = self._parts(2 * accumulation, accumulation)
        self._train_steps(parts, size, 2 * accumulation, accumulation)

    def val_step(self, size: int) -> None:
        """One training step of two items (one if the target is 1), then the validation pass
        of one batch of ``size``."""
        parts = self._parts(1, 1)
        self._train_steps(parts, min(2, self.target), 1, 1)
        evaluate(parts.steps, [self.val_items.batch(size)])

    def _resident(self) -> list[torch.Tensor]:
        held = [*self.model.parameters(), *self.model.buffers()]
        if self.opt is not None:
            held += [v for s in self.opt.state.values() for v in s.values()
                     if isinstance(v, torch.Tensor)]
        return held

    def _release(self) -> None:
        for p in self.model.parameters():
            p.grad = None
        if self.opt is not None:
            self.opt.load_state_dict(copy.deepcopy(self.opt_state))
        self.meter.cleanup()

    def probe(self, phase: str, size: int) -> bool:
        """Probe ``size`` (``phase`` 'train' or 'val'); record it; whether it fits."""
        done = next((p for p in self.probes if p.phase == phase and p.batch_size == size), None)
        if done is not None:
            return done.fits
        step = self.train_step if phase == "train" else self.val_step
        self._release()
        try:
            peak, fits = self.meter.measure(lambda: step(size), self._resident()), True
        except torch.OutOfMemoryError:
            peak, fits = self.meter.failed_peak(), False
        self._release()
        self.probes.append(Probe(phase, size, int(peak), fits))
        log.info("batch-size finder: %s batch %d: peak %s, %s", phase, size, format_bytes(peak),
                 "fits" if fits else "does not fit")
        return fits

    def peak(self, phase: str, size: int) -> int:
        return next(p.peak_bytes for p in self.probes if p.phase == phase and p.batch_size == size)


def _largest_fitting(fits: Callable[[int], bool], start: int, limit: int) -> int:
    """The largest ``n`` in ``[1, limit]`` with ``fits(n)`` (0: none), ``fits`` taken as
    monotone: doubling from ``start`` until a failure or ``limit``, then a binary search
    between the last fit and the first failure."""
    lo, hi = 0, limit + 1  # lo fits (0: by convention), hi does not (limit + 1: out of range)
    n = min(start, limit)
    while True:
        if not fits(n):
            hi = n
            break
        lo = n
        if n == limit:
            break
        n = min(2 * n, limit)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def _largest_train(prober: _Prober, target: int) -> int:
    """The largest training micro-batch that fits: the target itself (no accumulation, so no
    gradients held across micro-batches: it may fit where smaller sizes with accumulation do
    not), else the search over ``[1, target - 1]`` from 2 (a batch of 1 is probed only when 2
    does not fit: batch norm cannot train on one item)."""
    if prober.probe("train", target):
        return target
    if target == 1:
        return 0
    return _largest_fitting(lambda n: prober.probe("train", n), min(2, target - 1), target - 1)


def _probe_config(device: Any, options: dict[str, Any]) -> TrainConfig:
    """The run's options for probing: no files, no resume, no signals, quiet; class weights
    and the balanced sampler off (they change which items a batch holds, not its memory)."""
    cfg = TrainConfig.from_options(**{**options, "device": device})
    return dataclasses.replace(cfg, checkpoint_dir=None, metrics_file=None, resume=False,
                               tensorboard=False, verbose=False, handle_signals=False,
                               class_weights=None, sampler=None, batch_size_choice=None,
                               accumulation_steps=1)


def _nothing_fits(phase: str, prober: _Prober, budget: int) -> torch.OutOfMemoryError:
    return torch.OutOfMemoryError(
        f"batch-size finder: a {phase} batch of 1 does not fit the budget "
        f"{format_bytes(budget)} with headroom {prober.meter.headroom:g} (peak "
        f"{format_bytes(prober.peak(phase, 1))}): a smaller model, mixed precision or more "
        "memory is needed")


def find_batch_size(model: torch.nn.Module, dataset: Sequence[Any], criterion: Any, *,
                    target_batch_size: int, val_dataset: Sequence[Any] | None = None,
                    device: str | torch.device = "auto", memory_budget: int | None = None,
                    headroom: float = 0.1, max_val_batch_size: int | None = None,
                    collate_fn: Callable[[list[Any]], Any] | None = None,
                    val_collate_fn: Callable[[list[Any]], Any] | None = None,
                    **options: Any) -> BatchSizeResult:
    """Find the largest micro-batch that fits and the accumulation that keeps the target batch.

    Args:
        model: the model to train (left as it was: state, gradients, modes, device).
        dataset: the training set (map-style: ``len`` and indexing; items ``(inputs,
            targets)``); its longest items are probed.
        criterion: ``(outputs, targets) -> scalar loss``.
        target_batch_size: the effective batch to keep (the micro-batch never exceeds it).
        val_dataset: the validation set (default: ``dataset``), probed separately.
        device: where the run trains (``'auto'``: CUDA, MPS, else CPU).
        memory_budget: bytes the step may use; required off CUDA (see the module docstring);
            on CUDA, default: free device memory plus this process's allocator's holding.
        headroom: the margin: a size fits when ``peak x (1 + headroom) <= budget``.
        max_val_batch_size: the largest validation batch probed (default: the validation
            set's size).
        collate_fn, val_collate_fn: as the loaders' (default: torch's ``default_collate``;
            ``val_collate_fn`` defaults to ``collate_fn``).
        **options: the run's options (``train_model_advanced``'s: optimizer, precision,
            recovery, augmentation... the probe step is the run's).

    Returns:
        :class:`BatchSizeResult` (the choice, both peaks, the budget and every probe).

    Raises:
        TypeError, ValueError: a bad argument or option (named); no ``memory_budget`` off CUDA.
        torch.OutOfMemoryError: not even a batch of 1 fits.
    """
    check_int("target_batch_size", target_batch_size, low=1)
    if memory_budget is not None:
        check_int("memory_budget", memory_budget, low=1)
    check_real("headroom", headroom, low=0.0)
    val_set = dataset if val_dataset is None else val_dataset
    if len(dataset) == 0 or len(val_set) == 0:
        raise ValueError("find_batch_size needs a non-empty dataset and val_dataset")
    val_limit = len(val_set) if max_val_batch_size is None else check_int(
        "max_val_batch_size", max_val_batch_size, low=1)
    cfg = _probe_config(device, options)
    dev = resolve_device(cfg.device)
    meter = _meter(dev, memory_budget, headroom)
    collate = collate_fn or default_collate
    with _restored(model, cfg.optimizer):
        train = _Items(dataset, collate, longest_first(dataset))
        val = _Items(val_set, val_collate_fn or collate, longest_first(val_set))
        prober = _Prober(model, criterion, cfg, dev, meter, train, val, target_batch_size)
        largest = _largest_train(prober, target_batch_size)
        if largest == 0:
            raise _nothing_fits("train", prober, meter.budget)
        micro, accum = choose_micro_batch(target_batch_size, largest)
        while not prober.probe("train", micro):  # fits, unless the sizes were not monotone
            micro, accum = choose_micro_batch(target_batch_size, micro - 1)
        val_size = _largest_fitting(lambda n: prober.probe("val", n), min(micro, val_limit),
                                    val_limit)
        if val_size == 0:
            raise _nothing_fits("val", prober, meter.budget)
    if micro * 2 <= largest:
        log.warning("batch-size finder: micro-batch %d (the largest divisor of %d that fits) is "
                    "under half the largest fitting size %d; a target with more divisors "
                    "would use the memory better", micro, target_batch_size, largest)
    result = BatchSizeResult(micro, accum, target_batch_size, largest, val_size, meter.budget,
                             float(headroom), prober.peak("train", micro),
                             prober.peak("val", val_size), str(dev), prober.probes)
    log.info("batch-size finder: micro-batch %d x %d accumulation steps = %d; validation batch "
             "%d; budget %s\n%s", micro, accum, target_batch_size, val_size,
             format_bytes(meter.budget), result.table())
    return result


def recorded_choice(checkpoint_dir: str | Path, model_name: str, keep_last: int = 2
                    ) -> BatchSizeResult | None:
    """The choice recorded in the run's newest intact checkpoint (its options'
    ``batch_size_choice``); None when there is no checkpoint or it recorded none."""
    found = ck.find_resumable(Path(checkpoint_dir) / f"{model_name}_last.pt", keep_last,
                              best=Path(checkpoint_dir) / f"{model_name}_best.pt")
    if found is None:
        return None
    record = (found[1].get(ck.CONFIG_KEY) or {}).get("batch_size_choice")
    return BatchSizeResult.from_record(record) if isinstance(record, dict) else None

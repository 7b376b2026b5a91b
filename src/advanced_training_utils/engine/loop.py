"""One epoch of training and one pass of evaluation. No file I/O, no host reads per step.

Running sums (loss, metrics, example counts) stay 0-dim tensors on the device; the caller reads
them once at the end of the epoch with :func:`read_sums`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from ..clipping import GradientClipper
from ..metrics import EpochMetrics, batch_rows
from ..precision import MixedPrecisionTrainer
from .averaging import Average, NoAverage

__all__ = ["Parts", "split_batch", "to_device", "train_epoch", "evaluate", "read_sums"]

log = logging.getLogger(__name__)

_NULL = contextlib.nullcontext()
_END = object()  # end of a loader, for the one-batch look-ahead


def split_batch(batch: Any) -> tuple[Any, Any]:
    """``(inputs, targets)`` from a batch given as a tuple/list (first two items) or a dict with
    ``'inputs'``/``'targets'`` (or ``'x'``/``'y'``) keys."""
    if isinstance(batch, Mapping):
        for a, b in (("inputs", "targets"), ("x", "y")):
            if a in batch and b in batch:
                return batch[a], batch[b]
        raise ValueError(f"a dict batch needs 'inputs' and 'targets' keys, got {sorted(batch)}")
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise ValueError(
        f"each batch must be (inputs, targets) or a dict; got {type(batch).__name__}"
        + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
    )


def to_device(x: Any, device: torch.device) -> Any:
    """A batch's tensors (alone, or in tuples, lists and dicts) moved to ``device``."""
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, (tuple, list)):
        return type(x)(to_device(v, device) for v in x)
    if isinstance(x, Mapping):
        return {k: to_device(v, device) for k, v in x.items()}
    return x


class StepDecider(Protocol):
    """Decides each optimizer step (``engine.health.monitor.DivergenceMonitor``)."""

    def is_bad(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor: ...

    def step(self, bad: torch.Tensor) -> bool | None: ...


def _nothing(*args: Any) -> None:
    """The no-op callback (no ``after_step``, no progress bar)."""


@dataclass
class Parts:
    """What one training epoch needs, each a real object or a no-op with the same methods.

    ``scheduler`` is stepped per optimizer step when its ``interval`` is ``'batch'`` (a
    ``LearningRateScheduler``, or ``engine.parts.NoSchedule`` with ``interval='never'``);
    ``augment`` is applied to every training batch, ``(inputs, targets) -> (inputs, targets)``
    (``engine.parts.identity`` when off); validation batches are never augmented;
    ``average`` is updated after each optimizer step with the guard's verdict (the EMA of
    ``engine/averaging.py``; ``NoAverage``, an empty method, when off).
    """

    model: torch.nn.Module
    criterion: Callable[..., torch.Tensor]
    optimizer: torch.optim.Optimizer
    precision: MixedPrecisionTrainer
    clipper: GradientClipper
    monitor: StepDecider
    scheduler: Any
    augment: Callable[[Any, Any], tuple[Any, Any]]
    device: torch.device
    accumulation_steps: int = 1
    metrics: EpochMetrics = field(default_factory=EpochMetrics)  # validation metrics
    module: torch.nn.Module | None = None   # the unwrapped model when ``model`` is DDP
    average: Average = field(default_factory=NoAverage)  # per-step weight average (EMA)
    val_model: Callable[[Any], Any] | None = None  # validation's forward (compile=True)

    @property
    def inner(self) -> torch.nn.Module:
        """The caller's model (``model`` itself unless it is wrapped in DDP)."""
        return self.module if self.module is not None else self.model

    @property
    def evaluated(self) -> Callable[[Any], Any]:
        """Validation's forward: ``val_model`` (compiled) or the caller's model."""
        return self.val_model if self.val_model is not None else self.inner

    def sync_context(self, boundary: bool) -> Any:
        """DDP's ``no_sync()`` for micro-batches before an accumulation boundary."""
        if not boundary and hasattr(self.model, "no_sync"):
            return self.model.no_sync()
        return _NULL


@dataclass
class EpochSums:
    """An epoch's per-batch losses (0-d device tensors, no kernel launched per batch to keep
    them) and counts; reduced on the device by :meth:`totals` when read."""

    device: torch.device
    losses: list[torch.Tensor] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    examples: int = 0
    batches: int = 0
    optimizer_steps: int = 0
    metrics: EpochMetrics | None = None  # validation: the epoch's metrics (device statistics)

    def add(self, loss: torch.Tensor, size: int) -> None:
        self.losses.append(loss.detach())
        self.sizes.append(size)
        self.examples += size
        self.batches += 1

    def totals(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of size-weighted finite losses, examples in finite batches), as device scalars."""
        dtype = torch.float32 if self.device.type == "mps" else torch.float64
        if not self.losses:
            z = torch.zeros((), device=self.device, dtype=dtype)
            return z, z
        loss = torch.stack(self.losses).to(dtype)
        size = torch.tensor(self.sizes, dtype=dtype).to(self.device, non_blocking=True)
        finite = torch.isfinite(loss)
        return (torch.where(finite, loss, torch.zeros_like(loss)) * size).sum(), (
            finite.to(dtype) * size).sum()

    def state_dict(self) -> dict[str, Any]:
        """For mid-epoch checkpoints: the losses as one CPU tensor, counts as ints."""
        return {"losses": torch.stack(self.losses).detach().cpu() if self.losses else None,
                "sizes": list(self.sizes), "examples": self.examples, "batches": self.batches,
                "optimizer_steps": self.optimizer_steps}

    @classmethod
    def from_state(cls, state: dict[str, Any], device: torch.device) -> EpochSums:
        out = cls(device=device, sizes=list(state["sizes"]), examples=int(state["examples"]),
                  batches=int(state["batches"]), optimizer_steps=int(state["optimizer_steps"]))
        if state["losses"] is not None:
            out.losses = list(state["losses"].to(device).unbind(0))
        return out

    @classmethod
    def zeros(cls, device: torch.device) -> EpochSums:
        return cls(device=device)


def _forward(p: Parts, x: Any, y: Any, where: str, model: Callable[[Any], Any] | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Model (``p.model`` unless given) and loss under autocast; a failure names the batch
    instead of a torch internal."""
    try:
        with p.precision.autocast():
            out = (p.model if model is None else model)(x)
            loss = p.criterion(out, y)
    except torch.OutOfMemoryError:
        raise
    except (RuntimeError, IndexError, ValueError, TypeError) as e:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{where}: the model or criterion failed on inputs shaped {shape}: "
                         f"{str(e).splitlines()[0]}") from e
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        got = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f"{where}: criterion must return a scalar (0-d) loss tensor, got {got}")
    return out, loss


@dataclass
class _Window:
    """One accumulation window: its micro-batches' weighted losses and example counts.

    ``planned`` is the example count the loss weights assume (the first micro-batch's size times
    the micro-batches expected in the window); each micro-batch's loss is divided by
    ``planned / size``. When the window closes with another count (a short last batch, fewer
    batches than expected), the gradients are rescaled by ``planned / examples`` once.
    """

    planned: int
    examples: int = 0
    batches: int = 0
    loss: torch.Tensor | None = None

    def add(self, part: torch.Tensor, size: int) -> None:
        self.loss = part if self.loss is None else self.loss + part
        self.examples += size
        self.batches += 1


def _marked(loader: Iterable[Any], start: int, n_batches: int | None, accum: int
            ) -> Iterator[tuple[int, Any, bool]]:
    """``(index, batch, is_last)``. Without a length (and with accumulation) the loader is read
    one batch ahead to know which batch is the last: the last partial window must step."""
    if n_batches is not None or accum == 1:
        for i, batch in enumerate(loader, start=start):
            yield i, batch, n_batches is not None and i == n_batches - 1
        return
    it = iter(loader)
    cur, i = next(it, _END), start
    while cur is not _END:
        nxt = next(it, _END)
        yield i, cur, nxt is _END
        cur, i = nxt, i + 1


def train_epoch(parts: Parts, loader: Iterable[Any], sums: EpochSums | None = None,
                start: int = 0, n_batches: int | None = None,
                after_step: Callable[[int, EpochSums], None] = _nothing,
                progress: Callable[[EpochSums, int], None] = _nothing,
                epoch: int = 0) -> EpochSums:
    """Train over ``loader`` once (from batch ``start`` when resuming mid-epoch).

    Per batch: augment ``(x, y)`` (train only) -> autocast forward -> weighted loss -> scaled backward; at
    each accumulation boundary: unscale -> clip -> guard (step or skip) -> scaler update ->
    per-batch scheduler step -> ``after_step(batches_done, sums)`` (checkpoints, preemption,
    recovery checks). Gradients are zeroed at the start of each accumulation window, so the last
    step's gradients are still there after the epoch (for stability checks). ``progress(sums,
    batch_index)`` is called after every batch (the progress bar).

    Gradient accumulation: a window is ``accumulation_steps`` micro-batches, or fewer at the end
    of the epoch (the last partial window steps too, with or without a loader length; without
    one the loader is read one batch ahead). Each micro-batch's loss is weighted by its number of
    examples (first dimension of the targets) over the window's total, so a window's gradient is
    that of one batch of all its examples, short last batch included. This assumes the
    criterion returns the mean over the batch's examples (torch's default ``reduction='mean'``);
    a ``reduction='sum'`` loss is weighted the same way (its window gradient is then the
    example-weighted mean of the micro-batch sums, not the sum over the window), and a loss
    averaged over tokens or pixels is weighted by examples, not tokens: use a per-example mean
    for exact equivalence with one big batch.

    Returns:
        The epoch's device-side sums (see :class:`EpochSums`).
    """
    p = parts
    p.model.train()
    sums = sums if sums is not None else EpochSums.zeros(p.device)
    accum = p.accumulation_steps
    w: _Window | None = None
    i = start - 1
    for i, batch, last in _marked(loader, start, n_batches, accum):
        x, y = split_batch(batch)
        x, y = to_device(x, p.device), to_device(y, p.device)
        x, y = p.augment(x, y)
        size = batch_rows(y)
        if w is None:
            p.optimizer.zero_grad(set_to_none=True)
            expected = accum if n_batches is None or i >= n_batches else min(accum, n_batches - i)
            w = _Window(planned=size * expected)
        closes = last or w.batches + 1 == accum
        divisor = w.planned / size  # 1: nothing to weight (no kernel, no autograd node)
        with p.sync_context(boundary=closes):
            out, loss = _forward(p, x, y, f"epoch {epoch}, batch {i}")
            p.precision.scale_loss(loss if divisor == 1 else loss / divisor).backward()
        ld = loss.detach()
        sums.add(ld, size)
        w.add(ld if divisor == 1 else ld / divisor, size)
        if closes:
            _close_window(p, w, sums, i + 1, after_step)
            w = None
        progress(sums, i)
    if w is not None:  # the loader's len() was wrong: the open window steps now
        log.warning("train_loader yielded %d batches but its len() is %s; the last partial "
                    "accumulation window stepped at the end", i + 1, n_batches)
        _close_window(p, w, sums, i + 1, after_step)
    return sums


def _close_window(p: Parts, w: _Window, sums: EpochSums, done: int,
                  after_step: Callable[[int, EpochSums], None]) -> None:
    """The optimizer step at the end of an accumulation window (skipped by the guard if bad)."""
    p.precision.unscale_(p.optimizer)
    loss = w.loss
    if w.examples != w.planned:  # rare: a short batch or window; weights become size / examples
        factor = w.planned / w.examples
        for q in p.inner.parameters():
            if q.grad is not None:
                q.grad.mul_(factor)
        loss = loss * factor
    norm = p.clipper.clip(p.inner)
    bad = p.monitor.is_bad(loss, norm)
    stepped = p.monitor.step(bad)
    p.average.step(bad)  # not on a skipped step (masked on the device); off: an empty method
    p.precision.update()
    sums.optimizer_steps += 1
    if p.scheduler.interval == "batch":
        if stepped is None:
            stepped = not bool(bad)  # host read: the schedule must not advance on a skip
        if stepped:
            p.scheduler.step()
    after_step(done, sums)


@torch.no_grad()
def evaluate(parts: Parts, loader: Iterable[Any], model: torch.nn.Module | None = None
             ) -> EpochSums:
    """Mean loss and metrics over ``loader`` in eval mode, under the same autocast.

    Runs ``model`` if given (the averaged weights' own module, ``eval_ema``), else the
    unwrapped model (``parts.evaluated``: ``parts.inner``, compiled with ``compile=True``):
    under DDP, evaluation makes no collective, so
    ranks may hold validation shards of different lengths (the caller syncs buffers first).
    The metrics (``parts.metrics``) are reset, then updated per batch with tensor operations
    only (no host read for the built-ins); :func:`read_sums` computes them once.
    """
    p = parts
    p.model.eval()
    net = p.evaluated if model is None else model.eval()
    sums = EpochSums.zeros(p.device)
    sums.metrics = p.metrics
    p.metrics.reset()  # torchmetrics objects too: each epoch is computed on its own
    for batch in loader:
        x, y = split_batch(batch)
        x, y = to_device(x, p.device), to_device(y, p.device)
        out, loss = _forward(p, x, y, f"validation batch {sums.batches}", net)
        sums.add(loss, batch_rows(y))
        p.metrics.update(out, y)
    return sums


def read_sums(train: EpochSums, val: EpochSums | None,
              extra: dict[str, torch.Tensor | None] | None = None,
              reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
              world_size: int = 1) -> dict[str, Any]:
    """Read an epoch's device sums (and ``extra`` 0-d device values) in one transfer.

    Under DDP, ``reduce_sum`` all-reduces the whole vector first: sums, example counts and the
    validation metrics' statistics add up over ranks (each validation item is on one rank
    only: the validation shards are not padded) and the ``extra`` values are averaged, so
    every rank reads the same numbers. The metrics are computed on the device from the
    reduced statistics and read in the same transfer.

    Returns:
        ``train_loss`` (mean over examples whose batch loss was finite: those steps were skipped;
        NaN when none was) and ``nonfinite_train_examples``; with ``val``: ``val_loss``, NaN
        when any validation batch's loss was non-finite (a mean over the other batches would
        judge the model on part of the data, and pick a best epoch on it) and
        ``nonfinite_val_examples``, and ``val_<key>`` for every key the metrics compute
        (``val_recall_<class>`` for per-class recall); each ``extra`` key as a float (None
        values read as 0.0).
    """
    device = train.device
    metrics = val.metrics if val is not None and val.metrics is not None else EpochMetrics()

    def count(n: int) -> torch.Tensor:
        return torch.full((), float(n), device=device)

    vals = [*train.totals(), count(train.examples)]
    if val is not None:
        vals += [*val.totals(), count(val.examples)]
    extra = extra or {}
    vals += [v if v is not None else torch.zeros((), device=device) for v in extra.values()]
    stats = metrics.stats()
    vec = torch.cat([torch.stack([v.detach().double().to(device) for v in vals]),
                     stats.detach().to(device=device, dtype=torch.float64)])
    if reduce_sum is not None:
        vec = reduce_sum(vec)
    n = len(vals)
    if reduce_sum is not None and stats.numel():
        metrics.load_stats(vec[n:].to(stats.dtype))
    computed = metrics.compute_tensors()
    values = [v.detach().to(device=device, dtype=torch.float64) for v in computed.values()]
    host = torch.cat([vec[:n], torch.stack(values)]).tolist() if values else vec[:n].tolist()
    out: dict[str, Any] = {}
    out["train_loss"] = host[0] / host[1] if host[1] else float("nan")
    out["nonfinite_train_examples"] = int(round(host[2] - host[1]))
    k = 3
    if val is not None:
        out["nonfinite_val_examples"] = int(round(host[5] - host[4]))
        out["val_loss"] = (host[3] / host[4] if host[4] and not out["nonfinite_val_examples"]
                           else float("nan"))
        k = 6
    for j, key in enumerate(extra):
        out[key] = host[k + j] / world_size
    for j, key in enumerate(computed):
        out[f"val_{key}"] = host[n + j]
    return out

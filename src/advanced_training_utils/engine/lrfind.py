"""The LR range test: sweep the learning rate up exponentially, suggest one, restore everything.

:func:`find_lr` takes the arguments of ``train_model_advanced`` (the same options build the
same parts: optimizer, precision, clipping, accumulation, augmentation, class weights), then
for each of ``repeats`` short sweeps multiplies the LR by a constant factor after every
optimizer step, from ``min_lr`` to ``max_lr`` (the run's scheduler is not stepped), and stops
early when the loss, smoothed as the sweep goes (:func:`smooth`, an exponential moving average
with bias correction whose beta is ``smoothing``), exceeds ``diverge_factor`` times its best, or
a loss is NaN/Inf.

The suggestion, per sweep: the losses are smoothed without lag (:func:`smooth_centered`: a
centered running median, then mean, over windows of ``2 h + 1`` points, ``h`` a twentieth of
``num_steps``; a causal average would shift the steepest point to higher LRs by its delay), and
the suggestion is the LR at the steepest descent of that curve against log(lr), among the points
after the first tenth of the sweep (the start is flat and noisy) and up to the curve's minimum.
Start a decade or more below any LR you would train with. Sweeps differ in their data order (the
global RNGs and the loader's generators seeded with ``seed + r``). The result's
:attr:`LRFindResult.suggestion` is the median of the sweeps' suggestions (in log space) and
:attr:`LRFindResult.spread` their (min, max): a wide spread says the curve is too noisy to trust
one sweep (more ``repeats`` or ``num_steps`` help).

State. Before the first sweep, every part of the run's table (:mod:`.state`: model, optimizer
with its state, scheduler, precision/scaler, clipper statistics, augmentation RNG, early
stopping, progress, recovery) is saved with :func:`.state.save_parts` and deep-copied, with
this rank's state (:class:`.state.RankState`: the global RNGs, the loaders' generators, the
guard), the parameters' gradients and the modules' train/eval flags. Each sweep starts from
that copy, and after the last one it is loaded back, the way a resume loads a checkpoint.
The result holds plain floats computed before that restore (Lightning's tuner once
overwrote its suggestion when restoring: PR #21068; and left the state changed: #6675).

Not restored: the model's device (it is moved to the run's device, as
``train_model_advanced`` does), and the private state of a callable ``augment=`` or of a
loader's own random state beyond its ``torch.Generator`` objects (see :mod:`.dataorder`).
During a sweep the bad-step guard skips non-finite steps only (no spike skipping: a spike is
what the test looks for), and each step's loss is read on the host (the test stops on it;
``train_model_advanced`` itself stays free of per-step reads). One process (no DDP).

Example:
    >>> import torch
    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.randn(256, 4, generator=g); y = x @ torch.randn(4, 1, generator=g)
    >>> model = torch.nn.Linear(4, 1)
    >>> before = model.weight.detach().clone()
    >>> res = find_lr(model, DataLoader(TensorDataset(x, y), batch_size=16),
    ...               criterion=torch.nn.MSELoss(), num_steps=40, repeats=2, device="cpu",
    ...               max_lr=100.0)
    >>> torch.equal(model.weight, before), 1e-7 < res.suggestion < 100.0
    (True, True)
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .. import checkpoint as ck
from .._validate import check_int, check_real
from . import distributed
from .config import TrainConfig
from .health.guard import StepGuard
from .loop import EpochSums, train_epoch
from .options import TrainOptions, Unpack
from .parts import NoSchedule, RunParts, build_parts
from .prepare import check_inputs, resolve_device, rng_untouched
from .state import load_parts, save_parts

__all__ = ["LRFindSettings", "LRFindResult", "lr_schedule", "smooth", "smooth_centered",
           "steepest",
           "lr_range_test", "find_lr"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LRFindSettings:
    """The range test's settings, checked on construction (messages name the argument).

    Attributes:
        min_lr, max_lr: the first and last LR of a sweep (``0 < min_lr < max_lr``).
        num_steps: optimizer steps per sweep (>= 10), the LR multiplied by
            ``(max_lr / min_lr) ** (1 / (num_steps - 1))`` after each.
        repeats: sweeps, each from the same saved state with another data order (>= 1).
        smoothing: the beta, in [0, 1), of the moving average the divergence rule follows
            (0: the raw loss).
        diverge_factor: stop when the smoothed loss exceeds this times its best (> 1).
    """

    min_lr: float = 1e-7
    max_lr: float = 10.0
    num_steps: int = 100
    repeats: int = 3
    smoothing: float = 0.9
    diverge_factor: float = 4.0

    def __post_init__(self) -> None:
        check_real("min_lr", self.min_lr, low=0.0, low_inclusive=False)
        check_real("max_lr", self.max_lr, low=0.0, low_inclusive=False)
        if not self.max_lr > self.min_lr:
            raise ValueError(f"max_lr must be > min_lr, got max_lr={self.max_lr!r} and "
                             f"min_lr={self.min_lr!r}")
        check_int("num_steps", self.num_steps, low=10)
        check_int("repeats", self.repeats, low=1)
        check_real("smoothing", self.smoothing, low=0.0, high=1.0, high_inclusive=False)
        check_real("diverge_factor", self.diverge_factor, low=1.0, low_inclusive=False)


@dataclass(frozen=True)
class LRFindResult:
    """What the range test measured (plain floats; nothing refers to the model).

    Attributes:
        lrs: the planned LR of each step, ``num_steps`` of them (a sweep that stopped early
            used the first ``len(losses[r])``).
        losses: per sweep, the loss of each optimizer step taken (the step's window loss).
        smoothed: per sweep, :func:`smooth_centered` of its losses (what the suggestion reads).
        suggestions: per sweep, its suggested LR (None: too few points before the minimum).
        suggestion: the median of the sweeps' suggestions in log space (None: no sweep had one).
        spread: (min, max) of the sweeps' suggestions (None when ``suggestion`` is).
        stopped: per sweep, why it ended: ``'max_lr'``, ``'diverged'`` or ``'non-finite'``.
        settings: the :class:`LRFindSettings` used, as a dict.
    """

    lrs: tuple[float, ...]
    losses: tuple[tuple[float, ...], ...]
    smoothed: tuple[tuple[float, ...], ...]
    suggestions: tuple[float | None, ...]
    suggestion: float | None
    spread: tuple[float, float] | None
    stopped: tuple[str, ...]
    settings: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """The result as JSON-ready types (tuples as lists)."""
        return json.loads(self.to_json())

    def to_json(self, indent: int | None = None) -> str:
        """The result as JSON (every value finite: the sweeps stop before a non-finite loss)."""
        out = dataclasses.asdict(self)
        out["spread_ratio"] = self.spread[1] / self.spread[0] if self.spread else None
        return json.dumps(out, indent=indent, allow_nan=False)


def lr_schedule(min_lr: float, max_lr: float, num_steps: int) -> list[float]:
    """The exponential sweep: ``min_lr * (max_lr / min_lr) ** (k / (num_steps - 1))``."""
    return [min_lr * (max_lr / min_lr) ** (k / (num_steps - 1)) for k in range(num_steps)]


def smooth(losses: Iterable[float], beta: float) -> list[float]:
    """Exponential moving average with bias correction: ``a_k = beta a_{k-1} + (1 - beta)
    l_k``, reported as ``a_k / (1 - beta ** (k + 1))`` (``beta=0``: the losses themselves).
    Causal: it lags the losses by about ``1 / (1 - beta)`` steps (the divergence rule uses it,
    since it is known as the sweep goes)."""
    avg, out = 0.0, []
    for k, loss in enumerate(losses):
        avg = beta * avg + (1.0 - beta) * loss
        out.append(avg / (1.0 - beta ** (k + 1)))
    return out


def smooth_centered(losses: Iterable[float], half: int) -> list[float]:
    """A centered running median over ``2 half + 1`` points, then a centered running mean of
    that over as many (windows shrink at the ends): no lag (a causal average would move the
    steepest point to higher LRs by its delay), and a blow-up at the end of a sweep moves only
    the ``2 half`` points before it."""
    x = np.asarray(list(losses), dtype=float)
    n = len(x)
    med = np.array([np.median(x[max(0, i - half):i + half + 1]) for i in range(n)])
    return [float(med[max(0, i - half):i + half + 1].mean()) for i in range(n)]


def steepest(lrs: list[float], smoothed: list[float], skip: int | None = None) -> float | None:
    """The LR where ``smoothed`` falls fastest against log(lr): ``np.gradient`` over the points,
    the minimum among those after the first ``skip`` (default a tenth: the start is flat, and
    the smoothing's edge) and up to the smoothed minimum (after it the loss rises). None with
    fewer than 2 such points."""
    n = len(smoothed)
    if n < 3:
        return None
    lowest = int(np.argmin(smoothed))
    start = max(1, n // 10 if skip is None else skip)
    if lowest - start + 1 < 2:
        return None
    slope = np.gradient(np.asarray(smoothed), np.log(np.asarray(lrs[:n])))
    return float(lrs[start + int(np.argmin(slope[start:lowest + 1]))])


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every param group's LR to ``lr`` (in place when the optimizer holds it as a tensor)."""
    for g in optimizer.param_groups:
        if isinstance(g["lr"], torch.Tensor):
            g["lr"].fill_(lr)
        else:
            g["lr"] = lr


class _Stop(Exception):
    """Raised from the step callback to end a sweep; ``why`` is the reason."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


class _Recorder:
    """The loop's step decider during a sweep: keeps each step's loss (a device tensor) and
    lets ``guard`` decide (non-finite steps skipped, no spike detection)."""

    def __init__(self, guard: StepGuard) -> None:
        self.guard = guard
        self.last: torch.Tensor | None = None

    def is_bad(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
        self.last = loss.detach()
        return self.guard.is_bad(loss, grad_norm)

    def step(self, bad: torch.Tensor) -> bool | None:
        return self.guard.step(bad)


def _sweep(parts: RunParts, lrs: list[float], s: LRFindSettings) -> tuple[list[float], str]:
    """One sweep from the current state: ``(loss of each step, why it stopped)``."""
    opt = parts.optimizer
    rec = _Recorder(StepGuard(opt, enabled=True, spike_factor=None))
    steps = dataclasses.replace(parts.steps, monitor=rec, scheduler=NoSchedule(opt))
    losses: list[float] = []
    best = math.inf

    def after_step(done: int, sums: EpochSums) -> None:
        nonlocal best
        assert rec.last is not None
        loss = float(rec.last)  # host read: the sweep stops on it
        if not math.isfinite(loss):
            raise _Stop("non-finite")
        losses.append(loss)
        now = smooth(losses, s.smoothing)[-1]
        if len(losses) > 1 and now > s.diverge_factor * best:
            raise _Stop("diverged")
        best = min(best, now)
        if len(losses) == len(lrs):
            raise _Stop("max_lr")
        _set_lr(opt, lrs[len(losses)])

    _set_lr(opt, lrs[0])
    epoch = 0
    try:
        while True:
            epoch += 1
            sums = train_epoch(steps, parts.first_check.wrap(iter(parts.loader)),
                               n_batches=parts.n_batches, after_step=after_step, epoch=epoch)
            if sums.batches == 0:
                raise ValueError("train_loader yielded no batch")
    except _Stop as stop:
        return losses, stop.why


def _seed(parts: RunParts, seed: int) -> None:
    """Seed the global RNGs and the loader's generators: one sweep's data order."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    for g in parts.loader.generators:
        g.manual_seed(seed)


@contextlib.contextmanager
def _restoring(parts: RunParts) -> Iterator[Callable[[], None]]:
    """Save every stateful part; yield a function that restores them (call it before each
    sweep); restore them once more on exit, however the block ends."""
    table = copy.deepcopy(save_parts(parts.table))
    rank = copy.deepcopy(parts.rank.state_dict())
    model = parts.model
    grads = [None if p.grad is None else p.grad.detach().clone() for p in model.parameters()]
    modes = [m.training for m in model.modules()]

    def restore() -> None:
        # Copies: optimizer.load_state_dict keeps the given tensors, which a sweep then updates
        # in place (the model's are copied into the parameters by load_state_dict).
        load_parts(parts.table, {k: v if k == ck.MODEL_KEY else copy.deepcopy(v)
                                 for k, v in table.items()})
        parts.rank.load_state_dict(copy.deepcopy(rank))
        for p, g in zip(model.parameters(), grads):
            p.grad = None if g is None else g.clone()
        for m, mode in zip(model.modules(), modes):
            m.training = mode

    try:
        yield restore
    finally:
        restore()


def lr_range_test(parts: RunParts, settings: LRFindSettings | None = None, seed: int = 0
                  ) -> LRFindResult:
    """Run ``settings.repeats`` sweeps on built parts (:func:`.parts.build_parts`), each from
    the parts' current state with the data order of ``seed + r``; every part is restored
    afterwards (see the module docstring).

    Returns:
        The :class:`LRFindResult`, computed before the final restore.
    """
    s = settings or LRFindSettings()
    lrs = lr_schedule(s.min_lr, s.max_lr, s.num_steps)
    runs: list[tuple[list[float], str]] = []
    with _restoring(parts) as restore:
        for r in range(s.repeats):
            restore()
            _seed(parts, seed + r)
            runs.append(_sweep(parts, lrs, s))
            log.info("lr-find: sweep %d of %d: %d steps, stopped: %s", r + 1, s.repeats,
                     len(runs[-1][0]), runs[-1][1])
        result = _result(lrs, runs, s)
    return result


def _log_median(values: list[float]) -> float:
    """The median in log space: the middle value, or the geometric mean of the middle two."""
    v, m = sorted(values), len(values) // 2
    return v[m] if len(v) % 2 else math.sqrt(v[m - 1] * v[m])


def _half_window(num_steps: int) -> int:
    """The suggestion's smoothing: ``2 h + 1``-point windows, ``h`` a twentieth of the sweep."""
    return max(1, num_steps // 20)


def _result(lrs: list[float], runs: list[tuple[list[float], str]], s: LRFindSettings
            ) -> LRFindResult:
    half = _half_window(s.num_steps)
    smoothed = [smooth_centered(losses, half) for losses, _ in runs]
    each = [steepest(lrs, sm, skip=max(len(sm) // 10, 2 * half)) for sm in smoothed]
    found = [x for x in each if x is not None]
    if not found:
        log.warning("lr-find: no sweep had enough points before its minimum to suggest an LR; "
                    "lower min_lr or raise num_steps")
    median = _log_median(found) if found else None
    return LRFindResult(
        lrs=tuple(lrs), losses=tuple(tuple(x) for x, _ in runs),
        smoothed=tuple(tuple(x) for x in smoothed), suggestions=tuple(each),
        suggestion=median, spread=(min(found), max(found)) if found else None,
        stopped=tuple(why for _, why in runs), settings=dataclasses.asdict(s))


def find_lr(model: torch.nn.Module, train_loader: Iterable[Any],
            val_loader: Iterable[Any] | None = None,
            criterion: Callable[..., torch.Tensor] | None = None, *,
            min_lr: float = 1e-7, max_lr: float = 10.0, num_steps: int = 100, repeats: int = 3,
            smoothing: float = 0.9, diverge_factor: float = 4.0,
            **options: Unpack[TrainOptions]) -> LRFindResult:
    """The LR range test on the parts ``train_model_advanced(model, train_loader, val_loader,
    criterion, **options)`` would build; everything is restored afterwards.

    Args:
        model, train_loader, val_loader, criterion, options: as for ``train_model_advanced``
            (``learning_rate``, the scheduler, files and epochs do not matter here;
            ``val_loader`` only lets a ``monitor=`` on validation values be accepted).
        min_lr, max_lr, num_steps, repeats, smoothing, diverge_factor: see
            :class:`LRFindSettings`.

    Returns:
        :class:`LRFindResult`; ``.suggestion`` is the LR to train with.

    Raises:
        TypeError / ValueError: bad settings or options (named), as ``train_model_advanced``.
    """
    settings = LRFindSettings(min_lr, max_lr, num_steps, repeats, smoothing, diverge_factor)
    cfg = TrainConfig.from_options(**options)
    check_inputs(model, train_loader, val_loader, criterion)
    assert criterion is not None
    device = resolve_device(cfg.device)
    with rng_untouched(train_loader, val_loader):  # build_parts may read the labels
        parts = build_parts(model, train_loader, val_loader, criterion, cfg, device,
                            distributed.DistContext())
        return lr_range_test(parts, settings, seed=cfg.seed or 0)

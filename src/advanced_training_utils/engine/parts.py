"""The run's parts, built from the config: each a real object or a no-op with the same methods.

:func:`build_parts` makes everything a run needs, in a fixed order (the order draws nothing
from an RNG, but keep it: a resumed run must build what the saved one built), and the table
of stateful parts (:mod:`.state`) that checkpoints, resumes and recovery's snapshots use.

A feature that is off is a no-op object, so that neither the loop nor the run tests for None:
no scheduler is :class:`NoSchedule` (``interval='never'``), no early stopping is
:class:`NoEarlyStopping`, no augmentation and no mixing is :func:`identity` (and
:class:`~.state.NoState` in the table), no weight average is :class:`~.averaging.NoAverage`.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .. import checkpoint as ck
from ..clipping import GradientClipper
from ..early_stopping import EarlyStopping
from ..metrics import resolve_metrics
from ..mixing import BatchMixing
from ..precision import MixedPrecisionTrainer
from ..scheduler import LearningRateScheduler
from . import distributed
from .averaging import EMA, SWA, Average, NoAverage
from .balance import ClassWeights, balanced_loader, weigh_criterion
from .compiled import compile_forward, unwrap_compiled
from .config import TrainConfig
from .dataorder import ResumableLoader, make_resumable
from .health.guard import StepGuard
from .health.monitor import DivergenceMonitor
from .health.recovery import Recovery
from .loop import Parts, split_batch, to_device
from .prepare import (
    BatchFn,
    FirstBatchCheck,
    build_augment,
    build_mixing,
    build_optimizer,
    loader_length,
)
from .resume import optimizer_spec
from .state import (
    PROGRESS,
    EpochPosition,
    Fixed,
    KeepSettings,
    NoState,
    RankState,
    RunProgress,
    Stateful,
)

__all__ = ["NoSchedule", "NoEarlyStopping", "RunEarlyStopping", "Selection", "identity",
           "RunParts", "build_parts"]

log = logging.getLogger(__name__)


def identity(x: Any, y: Any) -> tuple[Any, Any]:
    """No augmentation: the batch's inputs and targets themselves (no copy, no kernel)."""
    return x, y


def _then_mix(augment: BatchFn | None, mixing: BatchMixing | None) -> BatchFn:
    """The training batches' hook: the augmentation, then the mixing (identity when off)."""
    if mixing is None:
        return augment or identity
    if augment is None:
        return mixing
    return lambda x, y: mixing(*augment(x, y))


class NoSchedule:
    """No LR schedule: ``interval='never'``, so the loop and the run never step it; a rollback
    still lowers the LRs through :meth:`scale_lr`."""

    interval = "never"
    is_plateau = False

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def step(self, metric: float | None = None) -> None:
        """Nothing to advance."""

    def scale_lr(self, factor: float) -> None:
        """Multiply every param group's LR by ``factor``."""
        for g in self.optimizer.param_groups:
            g["lr"] *= factor

    def state_dict(self) -> None:
        return None

    def load_state_dict(self, state: Any) -> None:
        """Nothing to restore."""


class RunEarlyStopping(EarlyStopping):
    """:class:`EarlyStopping` whose resume keeps this run's ``patience`` and ``min_delta``: the
    saved count of bad epochs, judged by the current options."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict({**state, "patience": self.patience, "min_delta": self.min_delta})
        self.should_stop = self.num_bad_epochs >= self.patience


class NoEarlyStopping:
    """No early stopping: never stops, nothing to save."""

    should_stop = False

    def step(self, value: float) -> bool:
        return False

    def state_dict(self) -> None:
        return None

    def load_state_dict(self, state: Any) -> None:
        """Nothing to restore."""


#: Logged keys (prefixes) for which a higher value is better: mode='min' on them is a warning.
_HIGHER_IS_BETTER = ("val_accuracy", "val_uar", "val_macro_f1", "val_recall_", "val_ccc")


@dataclass(frozen=True)
class Selection:
    """Model selection: the logged key the run follows and whether lower (``'min'``) or higher
    (``'max'``) is better. The best epoch, early stopping and the plateau scheduler follow it.

    Example:
        >>> s = Selection("val_uar", "max")
        >>> s.improved(0.71, best=0.70, min_delta=0.0), s.improved(0.70, best=0.70, min_delta=0.0)
        (True, False)
    """

    key: str
    mode: str

    @property
    def worst(self) -> float:
        """The best value before any epoch: every finite value improves on it."""
        return math.inf if self.mode == "min" else -math.inf

    def value(self, nums: Mapping[str, Any]) -> float:
        """The monitored value among an epoch's read numbers (:func:`.loop.read_sums`)."""
        if self.key not in nums:
            raise ValueError(f"monitor={self.key!r} is not among the values this run logs: "
                             + ", ".join(k for k in nums if k.endswith("loss")
                                         or k.startswith("val_")))
        return float(nums[self.key])

    def improved(self, value: float, best: float, min_delta: float) -> bool:
        """Whether ``value`` is finite and beats ``best`` by more than ``min_delta``."""
        if not math.isfinite(value):
            return False
        return value < best - min_delta if self.mode == "min" else value > best + min_delta


def _selection(cfg: TrainConfig, has_val: bool) -> Selection:
    """``cfg.monitor``; without a val_loader the default ``val_loss`` becomes ``train_loss``
    and a validation metric is refused."""
    key = cfg.monitor
    if not has_val and key == "val_loss":
        key = "train_loss"
    elif not has_val and key != "train_loss":
        raise ValueError(f"monitor={key!r} needs a val_loader (it is a validation value); "
                         "without one, monitor='train_loss'")
    higher, lower = key.startswith(_HIGHER_IS_BETTER), key.endswith("loss") or key.startswith(
        "val_mae")
    if (cfg.mode == "min" and higher) or (cfg.mode == "max" and lower):
        log.warning("monitor=%r with mode=%r: a %s value counts as better; is mode=%r meant?",
                    key, cfg.mode, "lower" if cfg.mode == "min" else "higher",
                    "max" if cfg.mode == "min" else "min")
    return Selection(key, cfg.mode)


@dataclass
class RunParts:
    """Everything one run is made of (see :func:`build_parts`)."""

    model: torch.nn.Module            # the caller's model, on the device
    opt_spec: dict[str, Any]          # the optimizer as built (checked on resume)
    val_loader: Iterable[Any] | None  # sharded under DDP
    loader: ResumableLoader           # the training loader, resumable mid-epoch
    n_batches: int | None             # the training loader's length (None: it has none)
    steps: Parts                      # what one epoch needs (the loop's view)
    scheduler: LearningRateScheduler | NoSchedule
    early: RunEarlyStopping | NoEarlyStopping
    monitor: DivergenceMonitor
    first_check: FirstBatchCheck
    selection: Selection              # what the best epoch, early stopping and plateau follow
    progress: RunProgress
    position: EpochPosition
    table: dict[str, Stateful]        # the checkpoint's parts (main rank)
    rank: RankState                   # this rank's entry of the checkpoint's ranks
    class_weights: ClassWeights       # the criterion's class weights (balance.py; off: None)
    ema: Average                      # ema_decay: per-step EMA (averaging.py; off: NoAverage)
    swa: Average                      # swa_start: per-epoch SWA (off: NoAverage)
    eval_average: Average             # eval_ema: the average validation runs on (else NoAverage)

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.steps.optimizer

    @property
    def clipper(self) -> GradientClipper:
        return self.steps.clipper

    def lr(self) -> Any:
        """The first param group's current learning rate (as the optimizer holds it)."""
        return self.steps.optimizer.param_groups[0]["lr"]


def build_parts(model: torch.nn.Module, train_loader: Iterable[Any],
                val_loader: Iterable[Any] | None, criterion: Callable[..., torch.Tensor],
                cfg: TrainConfig, device: torch.device, ctx: distributed.DistContext) -> RunParts:
    """Build the run's parts from ``cfg`` (the model moves to ``device``; loaders are sharded
    under DDP; a ``torch.compile``'d model is unwrapped: its original module is the run's)."""
    model = unwrap_compiled(model, cfg.compile)
    model.to(device)
    # class imbalance: from the whole training set (every rank the same), before sharding
    criterion, class_weights = weigh_criterion(criterion, train_loader, cfg, device,
                                               _float_dtype(model))
    train_loader = balanced_loader(train_loader, cfg)
    train_loader = ctx.shard(train_loader, cfg.seed or 0, train=True)
    if val_loader is not None:
        val_loader = ctx.shard(val_loader, cfg.seed or 0, train=False)
    optimizer = build_optimizer(cfg, model)
    opt_spec = optimizer_spec(optimizer)  # before a scheduler adds to the param groups
    precision, clipper, guard = _step_parts(cfg, optimizer, device, ctx)
    n_batches = loader_length(train_loader)  # None: no length (an IterableDataset, say)
    scheduler = _build_scheduler(cfg, optimizer, n_batches)
    metrics = resolve_metrics(cfg.metrics, device=device)
    augment, augmenter = build_augment(cfg, cfg.seed)
    mixing = build_mixing(cfg)
    first_check = FirstBatchCheck(cfg, criterion, model, device,  # on this rank's first batch
                                  metrics, mixing)
    selection = _selection(cfg, val_loader is not None)
    early = _early_stopping(cfg, scheduler, val_loader is not None)
    net = ctx.wrap(model, device)
    fwd, val_fwd = _forwards(cfg, net, model)  # compile=True: compiled forwards (compiled.py)
    loader = make_resumable(train_loader, (val_loader,))
    ema, swa, eval_average = _build_averages(cfg, model, loader, device, val_loader is not None)
    snapshot: dict[str, Stateful] = {   # what a rollback restores
        ck.MODEL_KEY: model,
        ck.OPTIMIZER_KEY: optimizer,
        ck.SCHEDULER_KEY: scheduler,
        ck.PRECISION_KEY: precision,
        ck.CLIPPER_KEY: KeepSettings(clipper, "max_norm", "norm_type"),  # the run's threshold
        ck.EMA_KEY: ema,                # the averages roll back with the weights
        ck.SWA_KEY: swa,
    }
    recovery = Recovery(snapshot, model, optimizer, scheduler, guard, enabled=cfg.recovery,
                        rollback_after=cfg.rollback_after, lr_factor=cfg.rollback_lr_factor,
                        max_rollbacks=cfg.max_rollbacks, divergence_factor=cfg.divergence_factor)
    monitor = DivergenceMonitor(guard, recovery, cfg.recovery_check_every)
    steps = Parts(model=fwd, criterion=criterion, optimizer=optimizer, precision=precision,
                  clipper=clipper, monitor=monitor, scheduler=scheduler,
                  augment=_then_mix(augment, mixing), device=device,
                  accumulation_steps=cfg.accumulation_steps, metrics=metrics,
                  module=model if fwd is not model else None,
                  val_model=val_fwd if val_fwd is not model else None, average=ema)
    progress = RunProgress(best_loss=selection.worst)
    position = EpochPosition(loader, progress)
    table: dict[str, Stateful] = {  # the checkpoint: one line per stateful part
        **snapshot,
        ck.EARLY_STOPPING_KEY: early,
        ck.AUGMENTATION_KEY: augmenter or NoState(),
        ck.MIXING_KEY: mixing or NoState(),
        PROGRESS: progress,
        ck.EPOCH_ORDER_KEY: position,
        ck.CONFIG_KEY: Fixed(cfg.to_plain()),
        ck.OPTIMIZER_SPEC_KEY: Fixed(opt_spec),
        ck.CLASS_WEIGHTS_KEY: class_weights,
        ck.RECOVERY_KEY: monitor,  # last: a snapshot saved without weights takes the loaded ones
    }
    return RunParts(model=model, opt_spec=opt_spec, val_loader=val_loader, loader=loader,
                    n_batches=n_batches,
                    steps=steps, scheduler=scheduler, early=early, monitor=monitor,
                    first_check=first_check, selection=selection, progress=progress,
                    position=position, table=table, rank=RankState(guard, position, device),
                    class_weights=class_weights, ema=ema, swa=swa, eval_average=eval_average)


def _step_parts(cfg: TrainConfig, optimizer: torch.optim.Optimizer, device: torch.device,
                ctx: distributed.DistContext) -> tuple[MixedPrecisionTrainer, GradientClipper,
                                                       StepGuard]:
    """What each optimizer step goes through: precision (autocast, scaler), the clipper (no
    threshold: ``inf``, norms still measured) and the guard that takes or skips the step."""
    amp_dtype = cfg.amp_dtype or ("float16" if device.type == "cuda" else "bfloat16")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        precision = MixedPrecisionTrainer(enabled=cfg.use_mixed_precision,
                                          device=device.type, dtype=amp_dtype)
    clipper = GradientClipper(cfg.gradient_clip if cfg.gradient_clip is not None else math.inf)
    guard = StepGuard(optimizer, enabled=cfg.recovery,
                      spike_factor=cfg.spike_factor if cfg.recovery else None,
                      spike_window=cfg.spike_window,
                      reduce_max=ctx.max_ if ctx.enabled else None)
    return precision, clipper, guard


def _early_stopping(cfg: TrainConfig, scheduler: LearningRateScheduler | NoSchedule,
                    has_val: bool) -> RunEarlyStopping | NoEarlyStopping:
    """Early stopping (a no-op without ``early_stop_patience``); without a val_loader it and
    the plateau scheduler follow the training loss, which is logged as a warning."""
    if not has_val and (cfg.early_stop_patience is not None or scheduler.is_plateau):
        log.warning("no val_loader: early stopping / plateau scheduling follow the training loss")
    if cfg.early_stop_patience is None:
        return NoEarlyStopping()
    return RunEarlyStopping(cfg.early_stop_patience, cfg.min_delta, cfg.mode)


def _build_averages(cfg: TrainConfig, model: torch.nn.Module, loader: ResumableLoader,
                    device: torch.device, has_val: bool) -> tuple[Average, Average, Average]:
    """The EMA, the SWA and the one validation runs on (``eval_ema``: SWA when on, else the
    EMA; the live model without a val_loader), each a no-op when off."""
    ema: Average = (EMA(model, cfg.ema_decay, cfg.ema_warmup, skip_bad=cfg.recovery)
                    if cfg.ema_decay is not None else NoAverage())
    swa: Average = (SWA(model, cfg.swa_start, lambda: _bn_inputs(loader, device))
                    if cfg.swa_start is not None else NoAverage())
    if cfg.eval_ema and not has_val:
        log.warning("eval_ema=True without a val_loader: the best epoch follows the live "
                    "model's training loss")
    eval_average = (swa if cfg.swa_start is not None else ema) if cfg.eval_ema and has_val \
        else NoAverage()
    return ema, swa, eval_average


def _bn_inputs(loader: ResumableLoader, device: torch.device) -> Iterator[Any]:
    """The training loader's inputs (on ``device``) for SWA's batch-norm pass, read from the
    loader the user gave (not the resumable wrapper: the recorded epoch order is untouched);
    every random state it draws from (global RNGs, the loaders' generators) is restored when
    the pass ends, so the run's data order and random draws are those of a run without it."""
    state = loader.rng_state()
    try:
        for batch in loader.original:
            yield to_device(split_batch(batch)[0], device)
    finally:
        loader.load_rng_state(state)


def _forwards(cfg: TrainConfig, net: torch.nn.Module, model: torch.nn.Module
              ) -> tuple[Callable[[Any], Any], Callable[[Any], Any]]:
    """The training and validation forwards: ``net`` (DDP or the model) and ``model``; with
    ``compile=True`` each compiled (validation's without DDP: it makes no collective)."""
    if not cfg.compile:
        return net, model
    fwd = compile_forward(net, cfg.compile_options)
    return fwd, fwd if net is model else compile_forward(model, cfg.compile_options)


def _float_dtype(model: torch.nn.Module) -> torch.dtype | None:
    """The dtype of the model's first floating-point parameter (None: it has none)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)


def _build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, n_batches: int | None
                     ) -> LearningRateScheduler | NoSchedule:
    if not cfg.use_scheduler:
        return NoSchedule(optimizer)
    steps_per_epoch = max(1, math.ceil(n_batches / cfg.accumulation_steps)) if n_batches else None
    if cfg.scheduler_type == "onecycle" and steps_per_epoch is None:
        raise ValueError("scheduler_type='onecycle' needs a train_loader with a length")
    return LearningRateScheduler(optimizer, cfg.scheduler_type,
                                 **cfg.scheduler_options(steps_per_epoch or 1))

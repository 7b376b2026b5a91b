"""``train_model_advanced``: one call that trains a model with every feature working together.

The run reads top to bottom in :func:`train_model_advanced`; each phase and each decision is a
named method of ``_Run``:

1. options -> :class:`TrainConfig` (validated once; unknown options are an error);
2. build: :func:`.parts.build_parts` makes every part from the config (a real object or a no-op
   with the same methods) and the table of stateful parts (:mod:`.state`);
3. resume, if asked: the saved options and optimizer are checked against this run's
   (:mod:`.resume`; :data:`.config.RESUME_RULES` says which options may change), then
   :func:`.state.load_parts` loads the table from the newest intact checkpoint and this rank's
   state (RNGs, the loaders' generators, the guard, the open epoch's sums) is restored;
4. per epoch: train (:func:`loop.train_epoch`, which calls back after every optimizer step for
   recovery checks, step checkpoints and preemption), evaluate, read the epoch's numbers once
   (the divergence monitor may roll back here), then the decisions: step the LR, keep the best
   weights, count for early stopping, stability checks; record the history row, ask the
   ``on_epoch_end`` callback (the one extension point: :meth:`_Run.call_back`), save; with
   weight averaging (:mod:`.averaging`) the EMA updates after each step the guard took, SWA
   averages at the end of each training epoch from ``swa_start`` on, and with ``eval_ema``
   validation runs on the averaged copy (the live model is never swapped);
5. the result: the best weights restored (unless ``restore_best_weights=False``) and a dict.

Devices: ``'auto'`` picks CUDA, then MPS, then CPU. ``'cuda'`` on a machine without CUDA logs a
warning and runs on the CPU (the guide's examples say ``'cuda'``; they still run on a laptop).

Checkpoint writes that fail (a full disk, say) leave the previous checkpoint intact, are logged,
and training goes on; after 3 failures in a row the run stops with :class:`CheckpointError`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import checkpoint as ck
from ..stability import TrainingStability
from . import distributed
from .compiled import plain_checkpoint, plain_keys
from .config import TrainConfig
from .health.monitor import EpochHealth
from .health.recovery import RecoveryEvent
from .loop import EpochSums, evaluate, read_sums, train_epoch
from .options import EpochCallback, TrainOptions, Unpack
from .parts import RunParts, build_parts
from .preemption import PreemptionHandler, TrainingPreempted
from .prepare import check_inputs, infer_modality, resolve_device
from .progress import Progress
from .record import HistoryRow, epoch_row, log_stability, run_grad_stats, summary_line
from .resume import check_optimizer, check_options
from .runfiles import RunFiles, closing
from .state import load_parts, save_parts

__all__ = ["train_model_advanced", "resolve_device", "infer_modality"]

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- the function
def train_model_advanced(model: torch.nn.Module, train_loader: Iterable[Any],
                         val_loader: Iterable[Any] | None = None,
                         criterion: Callable[..., torch.Tensor] | None = None,
                         **options: Unpack[TrainOptions]) -> dict[str, Any]:
    """Train ``model`` with scheduling, clipping, mixed precision, augmentation, early stopping,
    stability checks, a bad-step guard with divergence recovery, and crash-safe checkpoints.

    Args:
        model: the module to train; it is moved to the device and ends holding the trained
            (by default the best) weights.
        train_loader: iterable of ``(inputs, targets)`` batches (or dicts with those keys).
        val_loader: the same for validation (None: decisions follow the training loss).
        criterion: ``(outputs, targets) -> scalar loss``.
        **options: :class:`TrainOptions`, the fields of :class:`TrainConfig` (their defaults
            and meanings; an unknown name is a ``TypeError``). Run: ``epochs``,
            ``learning_rate``, ``device`` (``'auto'``: CUDA, MPS, else CPU), ``seed``, ``verbose``.
            Optimisation: ``optimizer`` (an optimizer or a factory of the parameters; default
            fused AdamW), ``weight_decay``, ``accumulation_steps``, ``batch_size_choice``
            (:mod:`.batchfind`), ``gradient_clip`` (None: none). Scheduler: ``use_scheduler``,
            ``scheduler_type``, ``factor``, ``T_max``, ``gamma``, ``step_size``, ``min_lr``,
            ``max_lr``, ``pct_start``, ``warmup_steps``, ``plateau_patience`` (a bare
            ``patience=`` is refused: early stopping has one too). Precision:
            ``use_mixed_precision``, ``amp_dtype``. Augmentation: ``use_augmentation``,
            ``augment`` (``'audio'``, ``'emotion'``, ``'notes'``, a callable; None: warned),
            ``augment_options``, ``augment_targets``; soft targets (:mod:`..mixing`):
            ``mixup_alpha``, ``cutmix_alpha``, ``label_smoothing``. Compilation (:mod:`.compiled`):
            ``compile``, ``compile_options``. Balance (:mod:`.balance`): ``class_weights``,
            ``sampler``. Stopping and checks: ``early_stop_patience``, ``min_delta``,
            ``restore_best_weights``, ``check_stability``, ``stability_every``, ``metrics``
            (logged as ``val_<key>``), ``monitor`` and ``mode`` (the best epoch, early stopping,
            plateau), ``on_epoch_end`` (given each history row; True stops). Files:
            ``checkpoint_dir``, ``model_name``, ``resume``, ``checkpoint_every_n_steps``,
            ``keep_last``, ``handle_signals``, ``metrics_file``, ``tensorboard``. Recovery:
            ``recovery``, ``spike_factor``, ``spike_window``, ``rollback_after``,
            ``rollback_lr_factor``, ``max_rollbacks``, ``divergence_factor``,
            ``recovery_check_every``. Averaging (:mod:`.averaging`): ``ema_decay``,
            ``ema_warmup``, ``swa_start``, ``eval_ema``. DDP: ``dist_timeout``.
    Returns:
        dict with ``best_epoch`` (1-based; 0: none improved), ``monitor``, ``best_metric`` (its best
        value), ``best_val_loss`` (the best epoch's val loss), ``history`` (a dict per epoch),
        ``stopped_early``, ``stopped_by_callback``, ``epochs_run``, ``best_checkpoint`` and
        ``last_checkpoint`` (paths or None), ``grad_stats`` (the clipper's statistics over the run),
        ``stability`` (the last check's findings or None), ``skipped_steps``, ``rollbacks``,
        ``recovery_events``, ``class_weights`` (floats, or None), ``best_weights`` and
        ``averaged_weights`` (see :mod:`.averaging`).

    Raises:
        TypeError / ValueError: bad options, model, loaders, labels or criterion, named; or a
            resume whose options, optimizer or loader generators do not fit the checkpoint
            (an option that may not change on resume, another optimizer type).
        CheckpointError: an unusable checkpoint folder, no intact checkpoint to resume from,
            repeated failed writes, or (``RunLockedError``) another live run using the same
            ``checkpoint_dir`` and ``model_name`` (the message names its pid and host).
        TrainingDivergedError: recovery used up its rollbacks (``.diagnosis`` says why).
        TrainingPreempted: after SIGTERM/SIGINT and the checkpoint (``SystemExit``, 143/130).
    """
    cfg = TrainConfig.from_options(**options)
    check_inputs(model, train_loader, val_loader, criterion)
    with _session(cfg) as (ctx, device, files):
        run = _Run(build_parts(model, train_loader, val_loader, criterion, cfg, device, ctx),
                   cfg, ctx, files)
        run.resume()
        with PreemptionHandler(cfg.handle_signals) as preempt, closing(files):
            for epoch in run.epochs():
                train = run.train(epoch, preempt)
                val = run.evaluate()
                nums, health = run.read(epoch, train, val)
                monitored = run.parts.selection.value(nums)
                run.step_schedule(epoch, monitored, health.event)
                improved = run.keep_best(epoch, monitored, health.event)
                run.stop_early(monitored)
                run.check_stability(epoch, nums, health)
                row = run.record(epoch, nums, health, improved)
                run.call_back(row, improved)
                run.save(row, improved)
                run.stop_if_preempted(preempt)
        return run.result()


@contextlib.contextmanager
def _session(cfg: TrainConfig
             ) -> Iterator[tuple[distributed.DistContext, torch.device, RunFiles]]:
    """Seed the RNGs, pick the device, set up the process group (if any) and open the run's
    files; close the files and tear the process group down on every exit."""
    if cfg.seed is not None:
        torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    ctx = distributed.setup(device, cfg.dist_timeout)
    with _process_group(ctx), _run_files(cfg, ctx.is_main) as files:
        yield ctx, ctx.device(device), files


@contextlib.contextmanager
def _process_group(ctx: distributed.DistContext) -> Iterator[None]:
    """Tear the process group (if any) down after the run. Preempted, every rank stops at the
    same step: they tear down together; on any other error, abort (a failing rank must not wait
    for the others in a barrier)."""
    try:
        yield
    except TrainingPreempted:
        ctx.teardown()
        raise
    except BaseException:
        ctx.abort()
        raise
    ctx.teardown()


@contextlib.contextmanager
def _run_files(cfg: TrainConfig, is_main: bool) -> Iterator[RunFiles]:
    """The run's files: takes the run's lock, released on every exit."""
    files = RunFiles(cfg, is_main)
    try:
        yield files
    finally:
        files.close(raise_errors=False)


class _Run:
    """One run's phases and decisions, each in a named method (read top to bottom in
    :func:`train_model_advanced`).

    Decisions and their homes: skip a step (the guard, in :meth:`.DivergenceMonitor.is_bad`
    and ``step``); roll back (:meth:`.DivergenceMonitor.check` mid-epoch and
    :meth:`.DivergenceMonitor.end_epoch`); step the LR (:meth:`step_schedule`; per batch in
    the loop); stop early (:meth:`stop_early`); keep the best weights (:meth:`keep_best`); save
    (:meth:`save`, and step checkpoints in :meth:`_after_step`).
    """

    def __init__(self, parts: RunParts, cfg: TrainConfig, ctx: distributed.DistContext,
                 files: RunFiles) -> None:
        self.parts, self.cfg, self.ctx, self.files = parts, cfg, ctx, files
        self.bar = Progress(enabled=cfg.verbose, total_batches=parts.n_batches)
        self.lr_history: list[float] = []
        self.stability: dict[str, Any] | None = None
        self.stopped_early = False
        self.stopped_by_callback = False
        self._epoch_started = time.perf_counter()

    # ------------------------------------------------------------------ resume
    def resume(self) -> None:
        """Load the checkpoint to resume from, if asked and found (every part of the table,
        then this rank's state); take recovery's first snapshot unless one was loaded."""
        found = self._find_checkpoint()
        if found is None:
            self.files.keep_previous_log()  # moved aside when this run writes its first line
        else:
            self._load(*found)
        if not self.parts.monitor.has_snapshot:  # a resume restores the saved run's snapshot
            self.parts.monitor.snapshot()
        self.stopped_early = bool(self.parts.early.should_stop)

    def _find_checkpoint(self) -> tuple[Path, dict[str, Any]] | None:
        cfg, files, device = self.cfg, self.files, self.parts.steps.device
        if cfg.resume is True:
            if files.last is None:
                raise ValueError("resume=True needs checkpoint_dir")
            found = ck.find_resumable(files.last, cfg.keep_last, map_location=device,
                                      best=files.best)
            if found is None:
                log.warning("resume=True: no checkpoint for %r in %s; starting fresh",
                         cfg.model_name, files.dir)
            return found
        if cfg.resume:
            return Path(cfg.resume), ck.load_checkpoint(cfg.resume, map_location=device)
        return None

    def _load(self, path: Path, state: dict[str, Any]) -> None:
        p, ctx = self.parts, self.ctx
        state = plain_checkpoint(state, path)  # weights saved from a compiled or DDP model
        check_options(state.get(ck.CONFIG_KEY), self.cfg, path)
        check_optimizer(state.get(ck.OPTIMIZER_SPEC_KEY), state[ck.OPTIMIZER_KEY], p.optimizer,
                        p.opt_spec, path)
        ranks = state[ck.RANKS_KEY]
        if len(ranks) != ctx.world_size:
            raise ck.CheckpointError(path, f"saved by {len(ranks)} process(es); this run has "
                                     f"{ctx.world_size}: resume with the same world size")
        load_parts(p.table, state)
        prog = p.progress
        if self.cfg.restore_best_weights:  # a damaged _best.pt falls back with a warning
            best = self.files.best_weights(prog.best_epoch, state, map_location=p.steps.device,
                                           entry=prog.best_kind)
            prog.best_weights = plain_keys(best, path) if best is not None else None
        p.rank.load_state_dict(ranks[ctx.rank])
        self.files.rewrite_metrics(prog.history)
        log.info("resumed from %s at epoch %d, batch %d", path, prog.epoch, prog.step)

    # ------------------------------------------------------------------ one epoch
    def epochs(self) -> Iterator[int]:
        """The epochs left to run (1-based), until early stopping or the callback says stop."""
        for epoch in range(self.parts.progress.epoch + 1, self.cfg.epochs + 1):
            if self.stopped_early or self.stopped_by_callback:
                return
            yield epoch

    def train(self, epoch: int, preempt: PreemptionHandler) -> EpochSums:
        """Train one epoch (from the saved batch after a mid-epoch resume)."""
        p = self.parts
        start = p.progress.step
        if not start:
            self._epoch_started = time.perf_counter()
            p.monitor.start_interval()
        sums = p.position.start(epoch)
        batches = p.first_check.wrap(iter(p.loader))
        self.bar.start(epoch, self.cfg.epochs, p.lr)
        train = train_epoch(p.steps, batches, sums=sums, start=start, n_batches=p.n_batches,
                            after_step=functools.partial(self._after_step, epoch, preempt),
                            progress=self.bar.update, epoch=epoch)
        if train.batches == 0:
            raise ValueError("train_loader yielded no batch this epoch")
        p.swa.end_epoch(epoch)  # SWA averages the epoch's end weights (a no-op when off)
        return train

    def _after_step(self, epoch: int, preempt: PreemptionHandler, done: int,
                    sums: EpochSums) -> None:
        """After each optimizer step: the recovery check and the step checkpoint when due, and
        a pending preemption signal (one rank's signal stops every rank)."""
        p, prog, cfg = self.parts, self.parts.progress, self.cfg
        prog.global_step += 1
        prog.step = done
        p.position.sums = sums
        if p.monitor.check_due(prog.global_step):
            p.monitor.check(epoch, prog.check_from, self.lr_history + [p.lr()])
            prog.check_from = done
        every = cfg.checkpoint_every_n_steps
        last_batch = p.n_batches is not None and done >= p.n_batches
        due = every is not None and prog.global_step % every == 0 and not last_batch
        stop = self.ctx.any_host(preempt.requested)
        if due or stop:
            self.files.save(self._checkpoint(), best=False)
        if stop:
            self._preempted(preempt)

    def evaluate(self) -> EpochSums | None:
        """Evaluate on the validation loader (None without one)."""
        p = self.parts
        if p.val_loader is None:
            return None
        self.ctx.sync_buffers(p.model)  # evaluation runs without DDP (uneven val shards)
        averaged = p.eval_average.module()  # eval_ema: the average's own copy; else None (live)
        if averaged is not None:
            self.ctx.sync_buffers(averaged)  # SWA's batch-norm pass ran on each rank's shard
        val = evaluate(p.steps, p.val_loader, averaged)
        if not self.ctx.any_host(val.examples > 0):
            raise ValueError("val_loader is empty: it yielded no batch; pass val_loader=None "
                             "to follow the training loss instead")
        return val

    def read(self, epoch: int, train: EpochSums, val: EpochSums | None
             ) -> tuple[dict[str, Any], EpochHealth]:
        """One host read of the epoch's numbers (reduced over ranks); the monitor's verdict."""
        p, ctx = self.parts, self.ctx
        nums = read_sums(train, val, p.monitor.epoch_values(),
                         reduce_sum=ctx.sum_ if ctx.enabled else None, world_size=ctx.world_size)
        if nums.get("nonfinite_val_examples"):
            log.warning("epoch %d: %d validation example(s) gave a non-finite loss: val_loss "
                        "is NaN and this epoch cannot be the best", epoch,
                        nums["nonfinite_val_examples"])
        self.lr_history.append(p.lr())
        return nums, p.monitor.end_epoch(nums, epoch, p.progress.check_from, self.lr_history)

    # ------------------------------------------------------------------ decisions
    def step_schedule(self, epoch: int, monitored: float, event: RecoveryEvent | None) -> None:
        """Step a per-epoch or plateau schedule (on the monitored value, in ``mode``); not after
        a rollback, and a plateau schedule not on a non-finite value."""
        sched = self.parts.scheduler
        if sched.interval != "epoch" or event is not None:
            return
        if sched.is_plateau and not math.isfinite(monitored):
            log.warning("epoch %d: monitored %s is %s; plateau scheduler not stepped",
                        epoch, self.parts.selection.key, monitored)
        else:
            sched.step(monitored if sched.is_plateau else None)

    def keep_best(self, epoch: int, monitored: float, event: RecoveryEvent | None) -> bool:
        """Whether the epoch is the new best (the monitored value finite, better in ``mode`` by
        more than ``min_delta``, no rollback); then its weights are kept (with
        ``restore_best_weights``): the weights validation ran on, live or averaged."""
        p, prog = self.parts, self.parts.progress
        improved = event is None and p.selection.improved(
            monitored, prog.best_loss, self.cfg.min_delta)
        if improved:
            prog.best_loss, prog.best_epoch = monitored, epoch
            prog.best_kind = p.eval_average.holds
            if self.cfg.restore_best_weights:
                weights = (p.model.state_dict() if prog.best_kind == "model"
                           else p.eval_average.weights())
                prog.best_weights = {k: v.detach().clone() for k, v in weights.items()}
        return improved

    def stop_early(self, monitored: float) -> None:
        """Count the epoch for early stopping (a no-op when it is off)."""
        self.stopped_early = self.parts.early.step(monitored)

    def check_stability(self, epoch: int, nums: dict[str, Any], health: EpochHealth) -> None:
        """Gradient and weight checks every ``stability_every`` epochs, or after a bad step."""
        cfg, model = self.cfg, self.parts.model
        if cfg.check_stability and (epoch % cfg.stability_every == 0 or health.skipped
                                    or nums["nonfinite_train_examples"]):
            self.stability = {"epoch": epoch,
                              "gradients": TrainingStability.check_gradients(model),
                              "weights": TrainingStability.check_weights(model)}
            log_stability(self.stability)

    # ------------------------------------------------------------------ record, save, stop
    def record(self, epoch: int, nums: dict[str, Any], health: EpochHealth,
               improved: bool) -> HistoryRow:
        """The epoch's history row: kept in the history and printed (:meth:`save` logs it)."""
        p = self.parts
        event = health.event.detail if health.event is not None else None
        row = epoch_row(epoch, nums, p.clipper.get_stats(), p.lr(), health.skipped,
                        health.spikes, p.monitor.rollbacks,
                        time.perf_counter() - self._epoch_started, improved, event,
                        self.stability)
        p.clipper.reset()
        p.progress.end_epoch(epoch, row)
        line = summary_line(row, self.cfg.epochs)
        if self.cfg.verbose:
            self.bar.finish(line)
        else:
            log.info(line)
        return row

    def call_back(self, row: HistoryRow, improved: bool) -> None:
        """Ask ``on_epoch_end(row)`` whether to stop (``row`` is the history's own dict).

        True stops the run after this epoch's checkpoint: the row gets ``stopped_by_callback``
        (in the history, the metrics log and the checkpoint), the result says so. Under DDP
        every rank calls it with its row (the same numbers; ``seconds`` is the rank's own) and
        rank 0's answer is taken by all. An exception, or an answer other than True, False or
        None (a ``TypeError``), propagates after the epoch's checkpoint is written, on the rank
        that raised it (a ``RuntimeError`` naming that rank on the others).
        """
        error: BaseException | None = None
        try:
            stop = _stop_asked(self.on_epoch_end(row))
        except BaseException as e:  # re-raised below, after the checkpoint
            stop, error = False, e
        answers = self.ctx.gather_object((stop, error is not None))  # [(stop, raised)] per rank
        raised = [rank for rank, (_, failed) in enumerate(answers) if failed]
        if raised:
            self.save(row, improved)  # written before the error leaves the run (closing waits)
            if error is not None:
                raise error
            raise RuntimeError(f"on_epoch_end raised on rank(s) {raised}; see their logs")
        if answers[0][0]:
            self.stopped_by_callback = True
            row["stopped_by_callback"] = True
            log.info("epoch %d: on_epoch_end returned True; stopping after this epoch's "
                     "checkpoint", row["epoch"])

    @property
    def on_epoch_end(self) -> EpochCallback:
        """The callback, or one that never stops."""
        return self.cfg.on_epoch_end or _go_on

    def save(self, row: HistoryRow, improved: bool) -> None:
        """The epoch's row to the metrics log; the epoch-end checkpoint, written in the
        background (and ``_best.pt`` if improved)."""
        self.files.write_metrics(dict(row))
        self.files.save(self._checkpoint(), best=improved, background=True)

    def _checkpoint(self) -> dict[str, Any] | None:
        """The checkpoint: the table's state and every rank's (built on every rank: per-rank
        state is gathered to all); None where nothing is written."""
        ranks = self.ctx.gather_object(self.parts.rank.state_dict())
        if not self.ctx.is_main or self.files.last is None:
            return None
        return {**save_parts(self.parts.table), ck.RANKS_KEY: ranks}

    def stop_if_preempted(self, preempt: PreemptionHandler) -> None:
        """End the run after the checkpoint when a signal came during validation or the last
        epoch; log early stopping."""
        if self.ctx.any_host(preempt.requested):
            self._preempted(preempt)
        if self.stopped_early:
            log.info("early stopping at epoch %d (best epoch %d)", self.parts.progress.epoch,
                     self.parts.progress.best_epoch)

    def _preempted(self, preempt: PreemptionHandler) -> None:
        last = self.files.last
        raise TrainingPreempted(preempt.signum or 15, str(last) if last else None)

    # ------------------------------------------------------------------ result
    def result(self) -> dict[str, Any]:
        """The best weights restored (unless ``restore_best_weights=False``); the result dict."""
        p, prog, files = self.parts, self.parts.progress, self.files
        if self.cfg.restore_best_weights and prog.best_weights is not None:
            p.model.load_state_dict(prog.best_weights)
        return {
            "best_val_loss": self._best_val_loss(),
            "best_epoch": prog.best_epoch,
            "best_metric": prog.best_loss,
            "monitor": p.selection.key,
            "history": prog.history,
            "stopped_early": self.stopped_early,
            "stopped_by_callback": self.stopped_by_callback,
            "epochs_run": len(prog.history),
            "best_checkpoint": str(files.best) if files.best is not None
            and files.best.exists() else None,
            "last_checkpoint": str(files.last) if files.last is not None
            and files.last.exists() else None,
            "grad_stats": run_grad_stats(prog.history),
            "stability": self.stability,
            "skipped_steps": p.monitor.skipped_steps,
            "rollbacks": p.monitor.rollbacks,
            "recovery_events": [e.as_dict() for e in p.monitor.events],
            "class_weights": p.class_weights.as_list(),
            "best_weights": prog.best_kind,
            "averaged_weights": {a.kind: a.weights() for a in (p.ema, p.swa)
                                 if a.holds != "model"},
        }

    def _best_val_loss(self) -> float:
        """The guide's ``best_val_loss``: the best monitored value when that is the validation
        loss (the default; the training loss without a val_loader), else the validation loss
        of the best epoch (inf before one)."""
        p, prog = self.parts, self.parts.progress
        if p.selection.key == "val_loss" or p.val_loader is None:
            return prog.best_loss
        rows = [h for h in prog.history if h["epoch"] == prog.best_epoch]
        return rows[0]["val_loss"] if rows else math.inf


def _go_on(row: HistoryRow) -> None:
    """The callback when ``on_epoch_end`` is None: never stops."""


def _stop_asked(answer: object) -> bool:
    """``on_epoch_end``'s answer: True stops, None or False go on (a numpy bool is a bool);
    anything else (a truthy string, a tensor, 1) is a ``TypeError``, since guessing would stop
    or continue by chance."""
    if isinstance(answer, np.bool_):
        answer = bool(answer)
    if answer is None or answer is False:
        return False
    if answer is True:
        return True
    raise TypeError(f"on_epoch_end must return True (stop), False or None (go on); it returned "
                    f"{answer!r} ({type(answer).__name__})")

"""``train_model_advanced``: one call that trains a model with every feature working together.

The run, top to bottom:

1. options -> :class:`TrainConfig` (validated once; unknown options are an error);
2. parts built from the config: optimizer, precision, clipper, guard, scheduler, augmentation,
   early stopping, recovery; each is a real object or a no-op with the same methods;
3. resume, if asked: the saved options and optimizer are checked against this run's
   (:mod:`.resume`; :data:`.config.RESUME_RULES` says which options may change), then every
   part's ``load_state_dict`` from the newest intact checkpoint, RNG states (the loaders'
   generators too), the position in the epoch and recovery's last good snapshot included;
4. per epoch: :func:`loop.train_epoch` (which calls back after every optimizer step for
   step checkpoints, preemption and recovery checks), :func:`loop.evaluate`, one host read of
   the epoch's numbers, then the epoch-level decisions (plateau/epoch scheduler, early stopping,
   best weights, stability checks, recovery), checkpoints and the metrics line;
5. at the end the best weights are restored (unless ``restore_best_weights=False``) and a result
   dict is returned.

Devices: ``'auto'`` picks CUDA, then MPS, then CPU. ``'cuda'`` on a machine without CUDA logs a
warning and runs on the CPU (the guide's examples say ``'cuda'``; they still run on a laptop).

Checkpoint writes that fail (a full disk, say) leave the previous checkpoint intact, are logged,
and training goes on; after 3 failures in a row the run stops with :class:`CheckpointError`.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from .. import checkpoint as ck
from ..clipping import GradientClipper
from ..early_stopping import EarlyStopping
from ..precision import MixedPrecisionTrainer
from ..scheduler import LearningRateScheduler
from ..stability import TrainingStability
from . import distributed
from .config import TrainConfig
from .dataorder import make_resumable
from .health.guard import StepGuard
from .health.recovery import Recovery
from .loop import EpochSums, Parts, evaluate, read_sums, resolve_metrics, train_epoch
from .options import TrainOptions, Unpack
from .preemption import PreemptionHandler, TrainingPreempted
from .prepare import (
    FirstBatchCheck,
    build_augment,
    build_optimizer,
    check_inputs,
    infer_modality,
    loader_length,
    resolve_device,
)
from .progress import Progress
from .resume import check_optimizer, check_options, optimizer_spec
from .runfiles import RunFiles, closing

__all__ = ["train_model_advanced", "resolve_device", "infer_modality"]

log = logging.getLogger(__name__)

LOADER_KEY = "epoch_order"
RANKS_KEY = "ranks"          # per-rank state: RNG, epoch sums, guard, loader RNG (one per rank)
RECOVERY_KEY = "recovery"
OPTIMIZER_SPEC_KEY = "optimizer_spec"  # the optimizer's type and hyperparameters as built
GLOBAL_STEP_KEY = "global_step"        # optimizer steps so far (step checkpoints, checks)
CHECK_FROM_KEY = "check_from"          # mid-epoch: the batch where the recovery interval began


# ---------------------------------------------------------------------------- the function
def train_model_advanced(
    model: torch.nn.Module,
    train_loader: Iterable[Any],
    val_loader: Iterable[Any] | None = None,
    criterion: Callable[..., torch.Tensor] | None = None,
    **options: Unpack[TrainOptions],
) -> dict[str, Any]:
    """Train ``model`` with scheduling, clipping, mixed precision, augmentation, early stopping,
    stability checks, a bad-step guard with divergence recovery, and crash-safe checkpoints.

    Args:
        model: the module to train; it is moved to the device and ends holding the trained
            (by default the best) weights.
        train_loader: iterable of ``(inputs, targets)`` batches (or dicts with those keys).
        val_loader: the same for validation; None uses the training loss for plateau scheduling,
            early stopping and best weights (with a warning).
        criterion: ``(outputs, targets) -> scalar loss``.
        **options: :class:`TrainOptions`, the fields of :class:`TrainConfig` (which holds the
            defaults; an unknown name is a ``TypeError``). Run: ``epochs``, ``learning_rate``,
            ``device`` (``'auto'``: CUDA, MPS, else CPU), ``seed``, ``verbose``. Optimisation:
            ``optimizer`` (an optimizer or a factory of the parameters; default fused AdamW),
            ``weight_decay``, ``accumulation_steps``, ``gradient_clip`` (None: no clipping).
            Scheduler: ``use_scheduler``, ``scheduler_type`` and ``LearningRateScheduler``'s
            ``factor``, ``T_max`` (default: epochs), ``gamma``, ``step_size``, ``min_lr``,
            ``max_lr`` (default: learning_rate), ``pct_start``, ``warmup_steps``, and
            ``plateau_patience`` (its ``patience``; a bare ``patience=`` is refused, since early
            stopping has one too). Precision: ``use_mixed_precision``, ``amp_dtype`` (None:
            float16 on CUDA, bfloat16 on CPU). Augmentation: ``use_augmentation``, ``augment``
            (``'audio'``, ``'emotion'``, ``'notes'`` or a callable; with None nothing is applied
            and a warning is logged), ``augment_options``. Stopping and checks:
            ``early_stop_patience``, ``min_delta``, ``restore_best_weights``,
            ``check_stability``, ``stability_every``, ``metrics``. Files: ``checkpoint_dir``,
            ``model_name``, ``resume`` (True: the newest intact ``{model_name}_last*.pt``; or a
            path), ``checkpoint_every_n_steps``, ``keep_last``, ``handle_signals``,
            ``metrics_file``, ``tensorboard``. Recovery: ``recovery``, ``spike_factor``,
            ``spike_window``, ``rollback_after``, ``rollback_lr_factor``, ``max_rollbacks``,
            ``divergence_factor``, ``recovery_check_every``. Under torchrun: ``dist_timeout``.

    Returns:
        dict with ``best_val_loss``, ``best_epoch`` (1-based; 0 if no epoch improved),
        ``history`` (one dict per epoch), ``stopped_early``, ``epochs_run``, ``best_checkpoint``
        and ``last_checkpoint`` (paths or None), ``grad_stats`` (the clipper's statistics over
        the run), ``stability`` (the last check's findings or None), ``skipped_steps``,
        ``rollbacks`` and ``recovery_events``.

    Raises:
        TypeError / ValueError: bad options, model, loaders, labels or criterion, named; or a
            resume whose options, optimizer or loader generators do not fit the checkpoint
            (an option that may not change on resume, another optimizer type).
        CheckpointError: an unusable checkpoint folder, no intact checkpoint to resume from,
            repeated failed writes, or (``RunLockedError``) another live run using the same
            ``checkpoint_dir`` and ``model_name`` (the message names its pid and host).
        TrainingDivergedError: recovery used up its rollbacks (``.diagnosis`` says why).
        TrainingPreempted: after SIGTERM/SIGINT and the checkpoint (a ``SystemExit``; code 143
            or 130).
    """
    cfg = TrainConfig.from_options(**options)
    check_inputs(model, train_loader, val_loader, criterion)
    if cfg.seed is not None:
        torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    ctx = distributed.setup(device, cfg.dist_timeout)
    run = None
    try:
        run = RunFiles(cfg, ctx.is_main)  # takes the run's lock; released on every exit below
        result = _train(model, train_loader, val_loader, criterion, cfg, ctx.device(device), ctx,
                        run)
    except TrainingPreempted:
        ctx.teardown()  # every rank stops at the same step: tear down together
        raise
    except BaseException:
        ctx.abort()  # a failing rank must not wait for the others in a barrier
        raise
    finally:
        if run is not None:
            run.close(raise_errors=False)
    ctx.teardown()
    return result


def _train(model: torch.nn.Module, train_loader: Iterable[Any], val_loader: Iterable[Any] | None,
           criterion: Callable[..., torch.Tensor], cfg: TrainConfig, device: torch.device,
           ctx: distributed.DistContext, run: RunFiles) -> dict[str, Any]:
    """The body of :func:`train_model_advanced` once the process group (if any) is up and the
    run's files are open."""
    model.to(device)
    train_loader = ctx.shard(train_loader, cfg.seed or 0, train=True)
    if val_loader is not None:
        val_loader = ctx.shard(val_loader, cfg.seed or 0, train=False)

    # ---- parts
    optimizer = build_optimizer(cfg, model)
    opt_spec = optimizer_spec(optimizer)  # before a scheduler adds to the param groups
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
    n_batches = loader_length(train_loader)  # None: no length (an IterableDataset, say)
    steps_per_epoch = max(1, math.ceil(n_batches / cfg.accumulation_steps)) if n_batches else None
    sched = None
    if cfg.use_scheduler:
        if cfg.scheduler_type == "onecycle" and steps_per_epoch is None:
            raise ValueError("scheduler_type='onecycle' needs a train_loader with a length")
        sched = LearningRateScheduler(optimizer, cfg.scheduler_type,
                                      **cfg.scheduler_options(steps_per_epoch or 1))
    first_check = FirstBatchCheck(cfg, criterion, model, device)  # on this rank's first batch
    augment, aug = build_augment(cfg, cfg.seed)
    early = (EarlyStopping(cfg.early_stop_patience, cfg.min_delta)
             if cfg.early_stop_patience is not None else None)
    if val_loader is None and (early is not None or (sched is not None and sched.is_plateau)):
        log.warning("no val_loader: early stopping / plateau scheduling follow the training loss")
    net = ctx.wrap(model, device)
    parts = Parts(model=net, criterion=criterion, optimizer=optimizer, precision=precision,
                  clipper=clipper, guard=guard, scheduler=sched, augment=augment, device=device,
                  accumulation_steps=cfg.accumulation_steps, metrics=resolve_metrics(cfg.metrics),
                  module=model if net is not model else None)
    recovery = Recovery(parts, sched, enabled=cfg.recovery, rollback_after=cfg.rollback_after,
                        lr_factor=cfg.rollback_lr_factor, max_rollbacks=cfg.max_rollbacks,
                        divergence_factor=cfg.divergence_factor)
    loader = make_resumable(train_loader, (val_loader,))

    # ---- progress of the run (what a checkpoint captures besides the parts)
    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {"val_loss": math.inf, "epoch": 0, "state": None}
    epochs_done, start_batch = 0, 0
    sums: EpochSums | None = None
    epoch_started = time.perf_counter()
    global_step = [0]

    def payload(epoch_done: int, batch: int, epoch_sums: EpochSums | None,
                check_from: int = 0) -> dict[str, Any] | None:
        """The checkpoint (built on every rank: per-rank state is gathered to all)."""
        ranks = ctx.gather_object({
            "rng": ck.capture_rng(),
            "epoch_sums": epoch_sums.state_dict() if (batch and epoch_sums is not None) else None,
            "guard": guard.state_dict(),
            "loader": loader.checkpoint_state(mid_epoch=bool(batch)),
        })
        if not ctx.is_main or run.last is None:
            return None
        return {
            ck.MODEL_KEY: model.state_dict(),
            ck.OPTIMIZER_KEY: optimizer.state_dict(),
            ck.SCHEDULER_KEY: sched.state_dict() if sched is not None else None,
            ck.PRECISION_KEY: precision.state_dict(),
            ck.CLIPPER_KEY: clipper.state_dict(),
            ck.EARLY_STOPPING_KEY: early.state_dict() if early is not None else None,
            ck.AUGMENTATION_KEY: aug.state_dict() if aug is not None else None,
            RECOVERY_KEY: recovery.state_dict(),
            ck.HISTORY_KEY: history,
            ck.EPOCH_KEY: epoch_done,
            ck.STEP_KEY: batch,
            LOADER_KEY: loader.order_state() if batch else None,
            RANKS_KEY: ranks,
            ck.BEST_KEY: {k: v for k, v in best.items() if k != "state"},
            ck.CONFIG_KEY: cfg.to_plain(),
            OPTIMIZER_SPEC_KEY: opt_spec,
            GLOBAL_STEP_KEY: global_step[0],
            CHECK_FROM_KEY: check_from,
        }

    # ---- resume
    found = None
    if cfg.resume is True:
        if run.last is None:
            raise ValueError("resume=True needs checkpoint_dir")
        found = ck.find_resumable(run.last, cfg.keep_last, map_location=device, best=run.best)
        if found is None:
            log.info("resume=True: no checkpoint for %r in %s; starting fresh", cfg.model_name,
                     run.dir)
    elif cfg.resume:
        found = Path(cfg.resume), ck.load_checkpoint(cfg.resume, map_location=device)
    if found is None:
        run.keep_previous_log()  # moved aside when this run writes its first line/checkpoint
    resume_order, resume_rng, resume_check_from = None, None, 0
    if found is not None:
        path, state = found
        check_options(state.get(ck.CONFIG_KEY), cfg, path)
        check_optimizer(state.get(OPTIMIZER_SPEC_KEY), state[ck.OPTIMIZER_KEY], optimizer,
                        opt_spec, path)
        model.load_state_dict(state[ck.MODEL_KEY])
        optimizer.load_state_dict(state[ck.OPTIMIZER_KEY])
        if sched is not None and state[ck.SCHEDULER_KEY] is not None:
            sched.load_state_dict(state[ck.SCHEDULER_KEY])
        precision.load_state_dict(state[ck.PRECISION_KEY])
        # Statistics from the checkpoint; the threshold is this run's (it may change on resume).
        clipper.load_state_dict({**state[ck.CLIPPER_KEY], "max_norm": clipper.max_norm})
        ranks = state[RANKS_KEY]
        if len(ranks) != ctx.world_size:
            raise ck.CheckpointError(path, f"saved by {len(ranks)} process(es); this run has "
                                     f"{ctx.world_size}: resume with the same world size")
        mine = ranks[ctx.rank]
        guard.load_state_dict(mine["guard"])
        if early is not None and state[ck.EARLY_STOPPING_KEY] is not None:
            # The count from the checkpoint, judged by this run's patience and min_delta.
            early.load_state_dict({**state[ck.EARLY_STOPPING_KEY], "patience": early.patience,
                                   "min_delta": early.min_delta})
            early.should_stop = early.num_bad_epochs >= early.patience
        if aug is not None and state[ck.AUGMENTATION_KEY] is not None:
            aug.load_state_dict(state[ck.AUGMENTATION_KEY])
        recovery.load_state_dict(state[RECOVERY_KEY])
        history = list(state[ck.HISTORY_KEY])
        epochs_done, start_batch = int(state[ck.EPOCH_KEY]), int(state[ck.STEP_KEY])
        global_step[0] = int(state.get(GLOBAL_STEP_KEY, 0))
        best.update(state[ck.BEST_KEY])
        if cfg.restore_best_weights:  # a damaged _best.pt falls back with a warning
            best["state"] = run.best_weights(best["epoch"], state, map_location=device)
        saved_loader = mine.get("loader") or {}
        now = {"global": mine["rng"], "generators": saved_loader.get("generators")}
        if start_batch:
            sums = EpochSums.from_state(mine["epoch_sums"], device)
            resume_order = state[LOADER_KEY]
            resume_check_from = int(state.get(CHECK_FROM_KEY, start_batch))
            # Restored by the loader around the creation of the resumed epoch's iterator.
            resume_rng = {"epoch_start": saved_loader.get("epoch_start"), "now": now}
        loader.load_rng_state(now)
        run.rewrite_metrics(history)
        log.info("resumed from %s at epoch %d, batch %d", path, epochs_done, start_batch)
    if not recovery.has_snapshot:  # a resume restores the saved run's snapshot
        recovery.snapshot()

    # ---- epochs
    stopped_early = bool(early is not None and early.should_stop)
    stability = None
    progress = Progress(enabled=cfg.verbose, total_batches=n_batches)
    lr_history: list[float] = []

    with PreemptionHandler(cfg.handle_signals) as preempt, closing(run):
        for epoch in range(epochs_done + 1, cfg.epochs + 1):
            if stopped_early:
                break
            if start_batch == 0:
                epoch_started = time.perf_counter()
                sums = None
                guard.reset_interval()
            loader.set_epoch(epoch)
            if start_batch:
                loader.start_epoch_at(resume_order, start_batch, resume_rng)
            batches = first_check.wrap(iter(loader))
            check_from = [resume_check_from if start_batch else 0]

            def after_step(done: int, epoch_sums: EpochSums, epoch: int = epoch,
                           check_from: list[int] = check_from) -> None:
                global_step[0] += 1
                n = cfg.recovery_check_every
                if n is not None and global_step[0] % n == 0:
                    _recovery_check(recovery, guard, epoch, check_from[0], lr_history + [
                        optimizer.param_groups[0]["lr"]])
                    check_from[0] = done
                every = cfg.checkpoint_every_n_steps
                last_batch = n_batches is not None and done >= n_batches
                due = every is not None and global_step[0] % every == 0 and not last_batch
                stop = ctx.any_host(preempt.requested)  # one rank's signal stops every rank
                if due or stop:
                    run.save(payload(epoch - 1, done, epoch_sums, check_from[0]), best=False)
                if stop:
                    raise TrainingPreempted(preempt.signum or 15,
                                            str(run.last) if run.last else None)

            progress.start(epoch, cfg.epochs, lambda: optimizer.param_groups[0]["lr"])
            tr = train_epoch(parts, batches, sums=sums, start=start_batch, n_batches=n_batches,
                             after_step=after_step, progress=progress.update, epoch=epoch)
            start_batch = 0
            found = None
            if tr.batches == 0:
                raise ValueError("train_loader yielded no batch this epoch")
            if val_loader is not None:
                ctx.sync_buffers(model)  # evaluation runs without DDP (uneven val shards)
            va = evaluate(parts, val_loader) if val_loader is not None else None
            if va is not None and not ctx.any_host(va.examples > 0):
                raise ValueError("val_loader is empty: it yielded no batch; pass val_loader=None "
                                 "to follow the training loss instead")
            steps = guard.interval_log()
            nums = read_sums(tr, va, {
                "skipped_steps": None if steps is None else steps[:, 2].sum(),
                "spike_steps": None if steps is None else steps[:, 3].sum(),
                "consecutive_bad": guard.consecutive(),
                **_loss_levels(steps),
            }, reduce_sum=ctx.sum_ if ctx.enabled else None, world_size=ctx.world_size)
            if nums.get("nonfinite_val_examples"):
                log.warning("epoch %d: %d validation example(s) gave a non-finite loss: val_loss "
                            "is NaN and this epoch cannot be the best", epoch,
                            nums["nonfinite_val_examples"])
            skipped, spikes = round(nums.pop("skipped_steps")), round(nums.pop("spike_steps"))
            consecutive = nums.pop("consecutive_bad")
            guard.total_skipped += skipped
            guard.total_spikes += spikes
            lr_history.append(optimizer.param_groups[0]["lr"])

            # Recovery at epoch end (when not checking every N steps, this is the only check).
            event = None
            if cfg.recovery_check_every is None or skipped:
                n_steps = 0 if steps is None else len(steps)
                rows = steps.tolist() if skipped else None  # read only when a step was bad
                event = recovery.after_check(rows, n_steps, consecutive, epoch, check_from[0],
                                             lr_history, nums.pop("median_loss"),
                                             nums.pop("first_loss"))
            guard.reset_interval()

            monitored = nums.get("val_loss", nums["train_loss"])
            if sched is not None and sched.interval == "epoch" and event is None:
                if sched.is_plateau and not math.isfinite(monitored):
                    log.warning("epoch %d: monitored loss is %s; plateau scheduler not stepped",
                                epoch, monitored)
                else:
                    sched.step(monitored if sched.is_plateau else None)
            improved = (event is None and math.isfinite(monitored)
                        and monitored < best["val_loss"] - cfg.min_delta)
            if improved:
                best.update(val_loss=monitored, epoch=epoch)
                if cfg.restore_best_weights:
                    best["state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
            if early is not None:
                stopped_early = early.step(monitored)

            if cfg.check_stability and (epoch % cfg.stability_every == 0 or skipped
                                        or nums["nonfinite_train_examples"]):
                stability = {"epoch": epoch,
                             "gradients": TrainingStability.check_gradients(model),
                             "weights": TrainingStability.check_weights(model)}
                _log_stability(stability)

            clip = clipper.get_stats()
            entry = {
                "epoch": epoch,
                "train_loss": nums["train_loss"],
                "val_loss": nums.get("val_loss", float("nan")),
                **{k: v for k, v in nums.items() if k.startswith("val_") and k != "val_loss"},
                "lr": optimizer.param_groups[0]["lr"],
                "grad_norm_mean": clip["mean_norm"],
                "grad_norm_max": clip["max_norm"],
                "clip_fraction": clip["clip_fraction"],
                "skipped_steps": skipped,
                "spike_steps": spikes,
                "nonfinite_train_examples": nums["nonfinite_train_examples"],
                **({"nonfinite_val_examples": nums["nonfinite_val_examples"]}
                   if "nonfinite_val_examples" in nums else {}),
                "rollbacks": recovery.rollbacks,
                "seconds": time.perf_counter() - epoch_started,
                "improved": improved,
            }
            if event is not None:
                entry["recovery_event"] = event.detail
            if stability is not None and stability["epoch"] == epoch:
                g, w = stability["gradients"], stability["weights"]
                entry["stability_healthy"] = g["healthy"] and w["healthy"]
                entry["nonfinite_params"] = sorted(set(
                    g["nan_grad_params"] + g["inf_grad_params"]
                    + w["nan_weight_params"] + w["inf_weight_params"]))
            clipper.reset()
            history.append(entry)
            run.write_metrics(entry)
            if cfg.verbose:
                progress.finish(_summary_line(entry, cfg.epochs))
            else:
                log.info(_summary_line(entry, cfg.epochs))
            run.save(payload(epoch, 0, None), best=improved, background=True)
            if ctx.any_host(preempt.requested):  # signalled during validation or the last epoch
                raise TrainingPreempted(preempt.signum or 15, str(run.last) if run.last else None)
            if stopped_early:
                log.info("early stopping at epoch %d (best epoch %d)", epoch, best["epoch"])

    if cfg.restore_best_weights and best["state"] is not None:
        model.load_state_dict(best["state"])
    return {
        "best_val_loss": best["val_loss"],
        "best_epoch": best["epoch"],
        "history": history,
        "stopped_early": stopped_early,
        "epochs_run": len(history),
        "best_checkpoint": str(run.best) if run.best is not None and run.best.exists() else None,
        "last_checkpoint": str(run.last) if run.last is not None and run.last.exists() else None,
        "grad_stats": _run_grad_stats(history),
        "stability": stability,
        "skipped_steps": guard.total_skipped,
        "rollbacks": recovery.rollbacks,
        "recovery_events": [e.as_dict() for e in recovery.events],
    }


def _loss_levels(steps: torch.Tensor | None) -> dict[str, torch.Tensor | None]:
    """Device scalars: the median finite loss of the interval and its first loss."""
    if steps is None:
        return {"median_loss": None, "first_loss": None}
    loss = steps[:, 0]
    finite = torch.where(torch.isfinite(loss), loss, torch.full_like(loss, math.nan))
    return {"median_loss": torch.nanmedian(finite), "first_loss": steps[0, 0]}


def _recovery_check(recovery: Recovery, guard: StepGuard, epoch: int, first_batch: int,
                    lr_history: list[float]) -> None:
    """A mid-epoch recovery check: one host read of the interval log (documented cost)."""
    steps = guard.interval_log()
    if steps is None:
        return
    rows = steps.tolist()
    levels = torch.stack([v.double() for v in _loss_levels(steps).values()]).tolist()
    consecutive = float(guard.consecutive()) if guard.consecutive() is not None else 0.0
    recovery.after_check(rows, len(rows), consecutive, epoch, first_batch, lr_history, *levels)
    guard.reset_interval()


def _run_grad_stats(history: list[dict[str, Any]]) -> dict[str, float]:
    if not history:
        return {"mean_norm": 0.0, "max_norm": 0.0, "clip_fraction": 0.0}
    return {
        "mean_norm": sum(h["grad_norm_mean"] for h in history) / len(history),
        "max_norm": max(h["grad_norm_max"] for h in history),
        "clip_fraction": sum(h["clip_fraction"] for h in history) / len(history),
    }


def _summary_line(e: dict[str, Any], epochs: int) -> str:
    extra = "".join(f" {k}={v:.4f}" for k, v in e.items()
                    if k.startswith("val_") and k != "val_loss" and isinstance(v, float))
    skipped = f" skipped={e['skipped_steps']}" if e["skipped_steps"] else ""
    event = f" [{e['recovery_event']}]" if e.get("recovery_event") else ""
    return (f"epoch {e['epoch']}/{epochs} train_loss={e['train_loss']:.4f} "
            f"val_loss={e['val_loss']:.4f}{extra} lr={e['lr']:.3g} "
            f"grad_norm={e['grad_norm_mean']:.3g} clip={e['clip_fraction']:.0%}{skipped} "
            f"({e['seconds']:.1f}s){' *' if e['improved'] else ''}{event}")


def _log_stability(s: dict[str, Any]) -> None:
    g, w = s["gradients"], s["weights"]
    if g["healthy"] and w["healthy"]:
        log.info("epoch %d stability: healthy (grad norm %.4g, max |w| %.4g)", s["epoch"],
                 g["total_norm"], w["max_weight"])
    else:
        log.warning("epoch %d stability: NaN/Inf in gradients of %s, weights of %s", s["epoch"],
                    g["nan_grad_params"] + g["inf_grad_params"],
                    w["nan_weight_params"] + w["inf_weight_params"])

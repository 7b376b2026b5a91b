"""Every option of ``train_model_advanced`` in one typed, validated dataclass.

Defaults live here and nowhere else. ``TrainConfig.from_options(**kw)`` rejects unknown keys with
a message listing the valid ones, then validates every field once: it is the first thing
``train_model_advanced`` does, so a bad option fails before the model, the RNGs or any file is
touched. The option names and types are also :class:`~.options.TrainOptions`, the
``TypedDict`` that types ``train_model_advanced(**options)``.

How the options are named (one rule for every feature's knobs):

* a feature is switched by ``use_<feature>`` (``use_scheduler``, ``use_mixed_precision``,
  ``use_augmentation``) or by its own name (``recovery``, ``check_stability``, ``tensorboard``);
* a knob handed to one of the guide's utilities keeps that utility's argument name
  (``factor``, ``T_max``, ``gamma``, ``step_size``, ``min_lr``, ``max_lr``, ``pct_start``,
  ``warmup_steps`` are :class:`~advanced_training_utils.scheduler.LearningRateScheduler`'s;
  ``min_delta`` and ``restore_best_weights`` early stopping's), *unless* two features share
  the name: then it is prefixed by the feature it tunes. ``patience`` is both the plateau
  scheduler's and early stopping's, so the options are ``plateau_patience`` and
  ``early_stop_patience``, and a bare ``patience=`` is a ``TypeError`` naming both;
* a knob of the engine's own features is prefixed by what it tunes: ``spike_*`` (the bad-step
  guard's spike detector), ``rollback_*`` (recovery's rollbacks), ``recovery_check_every``,
  ``stability_every``, ``checkpoint_every_n_steps``.

:data:`RENAMED` maps an option's old name to its new one; checkpoints that saved the old name
are compared under the new one on resume.

:data:`RESUME_RULES` says, for every option, whether it may change when a run resumes from a
checkpoint (see :func:`advanced_training_utils.engine.resume.check_options`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

from .._validate import check_choice, check_int, check_real
from ..metrics import ClassificationStats, EpochMetrics, resolve_metrics
from ..scheduler import SCHEDULER_TYPES
from .compiled import check_compile_options
from .options import (
    AmpDtype,
    Augment,
    AugmentModality,
    ClassWeightsMode,
    Device,
    EpochCallback,
    Metrics,
    Mode,
    OptimizerSpec,
    SamplerMode,
    SchedulerType,
)

__all__ = ["TrainConfig", "AUGMENT_MODALITIES", "AMP_DTYPES", "MODES", "RESUME_RULES", "RENAMED",
           "AMBIGUOUS", "APPLIES", "FIXED", "NOT_COMPARED", "CLASS_WEIGHT_MODES", "SAMPLER_MODES"]

AUGMENT_MODALITIES: tuple[str, ...] = get_args(AugmentModality)
AMP_DTYPES: tuple[str, ...] = get_args(AmpDtype)
MODES: tuple[str, ...] = get_args(Mode)
CLASS_WEIGHT_MODES: tuple[str, ...] = get_args(ClassWeightsMode)
SAMPLER_MODES: tuple[str, ...] = get_args(SamplerMode)

#: The longest ``model_name`` in bytes (UTF-8): file names are limited to 255 bytes, and the run's
#: files add up to 55 to it (``.{name}_metrics.jsonl.<id>.tmp``, ``{name}_metrics.<time>.jsonl``).
MAX_MODEL_NAME_BYTES = 200
APPLIES = "applies"          # may change on resume: the new value takes effect (a warning says so)
FIXED = "fixed"              # may not change on resume: ValueError naming old and new values
NOT_COMPARED = "not compared"

_SCHEDULE = "the schedule lives in the scheduler's saved state"
_GUARD = "the bad-step guard's saved window and threshold depend on it"

#: Every option of :class:`TrainConfig` -> (rule on resume, what happens / why). A resume
#: compares the checkpoint's saved options with the new ones (``to_plain`` values): an
#: ``APPLIES`` option that changed is logged (one WARNING per option, old and new values) and
#: the new value is used; a ``FIXED`` option that changed raises ``ValueError`` before anything
#: is loaded (pass the saved value, or ``resume=False`` for a fresh run). Adding an option
#: without a rule here fails ``tests/test_resume.py``.
def _same(rule: str, why: str, *names: str) -> dict[str, tuple[str, str]]:
    """One rule and reason for several options."""
    return {name: (rule, why) for name in names}


RESUME_RULES: dict[str, tuple[str, str]] = {
    "epochs": (APPLIES, "the run's length; a schedule whose horizon came from epochs (cosine "
               "without T_max, onecycle) keeps its saved horizon"),
    "learning_rate": (FIXED, "the LR lives in the optimizer's and scheduler's saved state"),
    "device": (APPLIES, "the checkpoint is loaded onto the new device"),
    **_same(APPLIES, "checkpoints and the metrics log are written to the new place or name",
            "checkpoint_dir", "model_name"),
    "optimizer": (FIXED, "compared by type and hyperparameters (resume.check_optimizer), "
                  "since the optimizer's state is restored"),
    "weight_decay": (FIXED, "restored with the optimizer's param groups"),
    "accumulation_steps": (FIXED, "the position in the epoch and the schedule count in steps"),
    "batch_size_choice": (FIXED, "the micro-batch and accumulation the run's steps are counted "
                          "in; a resume reuses the recorded choice (batchfind.recorded_choice)"),
    "seed": (FIXED, "the data order and augmentation streams were drawn from it"),
    **_same(FIXED, _SCHEDULE, "use_scheduler", "scheduler_type", "plateau_patience", "factor",
            "T_max", "gamma", "step_size", "min_lr", "max_lr", "pct_start", "warmup_steps"),
    "gradient_clip": (APPLIES, "the new threshold clips from the first step after resuming"),
    **_same(FIXED, "the loss scaler's state belongs to the saved precision",
            "use_mixed_precision", "amp_dtype"),
    **_same(FIXED, "the augmentation's random streams are restored",
            "use_augmentation", "augment", "augment_options"),
    **_same(APPLIES, "the model's forward is compiled or not from the resumed step; it does "
            "not change the math (compiled.py)", "compile", "compile_options"),
    "augment_targets": (FIXED, "how the augment callable is called"),
    **_same(FIXED, "the training targets (the loss each step minimises) and the mixing's random "
            "stream, which is restored", "mixup_alpha", "cutmix_alpha", "label_smoothing"),
    "class_weights": (FIXED, "the loss each step minimises; the saved weights are restored"),
    "sampler": (FIXED, "the data each epoch draws, and the recorded order and generators"),
    "early_stop_patience": (APPLIES, "early stopping keeps its count of bad epochs and stops "
                            "when it reaches the new patience"),
    "min_delta": (APPLIES, "improvements from now on are judged with the new min_delta"),
    "restore_best_weights": (APPLIES, "decides what the model holds at the end"),
    **_same(APPLIES, "stability checks from the next epoch", "check_stability",
            "stability_every"),
    "metrics": (APPLIES, "validation metrics from the next evaluation"),
    "monitor": (FIXED, "the best value so far and early stopping's and the plateau "
                "scheduler's saved bests are values of the monitored key"),
    "mode": (FIXED, "the saved bests were judged in the saved mode"),
    "on_epoch_end": (APPLIES, "a callable: never saved (the checkpoint's options hold its name "
                     "only); this run's callback is called from the next epoch"),
    "checkpoint_every_n_steps": (APPLIES, "step checkpoints from now on"),
    "keep_last": (APPLIES, "rotation from the next checkpoint"),
    "handle_signals": (APPLIES, "signal handling for this process"),
    **_same(FIXED, _GUARD, "recovery", "spike_factor", "spike_window"),
    **_same(APPLIES, "used by the next recovery check or rollback", "rollback_after",
            "rollback_lr_factor", "divergence_factor"),
    "max_rollbacks": (APPLIES, "the rollbacks already made count against the new limit"),
    "recovery_check_every": (APPLIES, "recovery checks every N optimizer steps from now on"),
    **_same(APPLIES, "the saved average and its counter are kept; the new value applies from "
            "the next update", "ema_decay", "ema_warmup", "swa_start"),
    "eval_ema": (FIXED, "the best value so far was judged on the saved choice of weights "
                 "(live or averaged)"),
    "dist_timeout": (APPLIES, "the process group of this run"),
    "resume": (NOT_COMPARED, "the option that asks for the resume"),
    "metrics_file": (APPLIES, "the saved history is rewritten to the new file"),
    "tensorboard": (APPLIES, "TensorBoard logging from the next epoch"),
    "verbose": (APPLIES, "progress output of this run"),
}


#: Old option name -> new name (saved options of older checkpoints are read under the new name).
RENAMED: dict[str, str] = {"patience": "plateau_patience"}

#: Option names refused with a message of their own (a plain "unknown option" would not help).
AMBIGUOUS: dict[str, str] = {
    "patience": "option 'patience' is ambiguous in train_model_advanced: pass plateau_patience= "
                "(epochs without improvement before the plateau scheduler lowers the LR) or "
                "early_stop_patience= (epochs without improvement before training stops)",
}


@dataclass
class TrainConfig:
    """Options of a training run (see ``train_model_advanced`` for their meaning)."""

    epochs: int = 10
    learning_rate: float = 1e-3
    device: Device = "auto"
    checkpoint_dir: Path | str | None = None
    model_name: str = "model"
    # optimisation
    optimizer: OptimizerSpec = None
    weight_decay: float = 0.01
    accumulation_steps: int = 1
    # the batch-size finder's choice (batchfind.BatchSizeResult.record()), recorded for resume
    batch_size_choice: dict[str, Any] | None = None
    seed: int | None = None
    # scheduler
    use_scheduler: bool = True
    scheduler_type: SchedulerType = "plateau"
    plateau_patience: int = 5   # ReduceLROnPlateau's patience (not early stopping's)
    factor: float | None = None
    T_max: int | None = None    # cosine's horizon; None: epochs
    gamma: float | None = None
    step_size: int = 10
    min_lr: float = 0.0
    max_lr: float | None = None  # onecycle's peak; None: learning_rate
    pct_start: float | None = None  # onecycle's rise fraction; None: 0.3, or warmup_steps sets it
    # Counted in scheduler steps: epochs for plateau/cosine/step/exp, optimizer steps for onecycle
    # (see scheduler.py for how the warmup composes with each type).
    warmup_steps: int = 0
    # clipping / precision
    gradient_clip: float | None = 1.0
    use_mixed_precision: bool = False
    amp_dtype: AmpDtype | None = None  # None: float16 on CUDA, bfloat16 on CPU
    # augmentation
    use_augmentation: bool = False
    augment: Augment = None
    augment_options: dict[str, Any] = field(default_factory=dict)
    # torch.compile of the model's forward (engine/compiled.py); options: torch.compile's kwargs
    compile: bool = False
    compile_options: dict[str, Any] = field(default_factory=dict)
    augment_targets: bool = False  # True: a callable augment takes and returns (inputs, targets)
    # augmentation that sees the labels (mixing.py): soft targets; on their own switches
    mixup_alpha: float | None = None
    cutmix_alpha: float | None = None  # time-segment mixing along the last (time) axis
    label_smoothing: float = 0.0
    # class imbalance (engine/balance.py)
    class_weights: ClassWeightsMode | None = None  # 'balanced': n / (n_classes * count_c)
    sampler: SamplerMode | None = None             # 'balanced': each class drawn equally often
    # stopping and checks
    early_stop_patience: int | None = None
    min_delta: float = 0.0
    restore_best_weights: bool = True
    check_stability: bool = False
    stability_every: int = 10
    # 'uar', 'macro_f1', 'accuracy', 'per_class_recall', 'ccc', 'mae', torchmetrics objects or
    # callables (metrics.py); each logged as val_<key>
    metrics: Metrics = None
    # model selection: the logged key (val_loss, train_loss, val_<metric key>) that picks the
    # best epoch and drives early stopping and the plateau scheduler; 'max': higher is better
    monitor: str = "val_loss"
    mode: Mode = "min"
    # the one extension point: called with each epoch's history row; True stops the run
    on_epoch_end: EpochCallback | None = None
    # crash safety and recovery
    checkpoint_every_n_steps: int | None = None
    keep_last: int = 2
    handle_signals: bool = True
    recovery: bool = True
    spike_factor: float | None = 10.0
    spike_window: int = 20
    rollback_after: int = 5
    rollback_lr_factor: float = 0.5
    max_rollbacks: int = 3
    divergence_factor: float = 3.0
    recovery_check_every: int | None = None
    # weight averaging (engine/averaging.py)
    ema_decay: float | None = None  # EMA of the weights after each step taken; None: off
    ema_warmup: bool = True         # decay min(ema_decay, (1 + n) / (10 + n)) at update n + 1
    swa_start: int | None = None    # SWA: equal average of epoch ends from this epoch (1-based)
    eval_ema: bool = False          # validation (and the best epoch) on the averaged weights
    # distribution
    dist_timeout: float = 60.0
    # output
    # True: the newest intact {model_name}_last*.pt in checkpoint_dir; a path: that file
    resume: bool | str | Path = False
    metrics_file: Path | str | None = None
    tensorboard: bool = False   # checkpoint_dir/tensorboard; needs the `tensorboard` extra
    verbose: bool = True        # a bar on a terminal, else one line per epoch (progress.py)

    @classmethod
    def from_options(cls, **options: Any) -> TrainConfig:
        """Build from keyword options; unknown keys raise ``TypeError`` naming the valid ones
        (``patience``: naming ``plateau_patience`` and ``early_stop_patience``).

        Example:
            >>> TrainConfig.from_options(epochs=3, plateau_patience=2).plateau_patience
            2
            >>> TrainConfig.from_options(patience=2)  # doctest: +ELLIPSIS
            Traceback (most recent call last):
            ...
            TypeError: option 'patience' is ambiguous ...: pass plateau_patience= ... or early_stop_patience= ...
        """
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(names))
        refused = [AMBIGUOUS[k] for k in unknown if k in AMBIGUOUS]
        if refused:
            raise TypeError("; ".join(refused))
        if unknown:
            raise TypeError(
                f"unknown option(s) {', '.join(map(repr, unknown))}; valid options: "
                + ", ".join(names)
            )
        cfg = cls(**options)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Check every field; raise ``ValueError``/``TypeError`` naming the field."""
        check_int("epochs", self.epochs, low=1)
        check_real("learning_rate", self.learning_rate, low=0.0, low_inclusive=False)
        self.device = _check_device(self.device)
        if self.checkpoint_dir is not None and not isinstance(self.checkpoint_dir, (str, Path)):
            raise TypeError(f"checkpoint_dir must be a path or None, got {self.checkpoint_dir!r}")
        if not isinstance(self.model_name, str) or not self.model_name or "/" in self.model_name:
            raise ValueError(f"model_name must be a non-empty file-name string, got {self.model_name!r}")
        if len(self.model_name.encode()) > MAX_MODEL_NAME_BYTES:
            raise ValueError(f"model_name is {len(self.model_name.encode())} bytes long; at most "
                             f"{MAX_MODEL_NAME_BYTES} are allowed (the run's files add up to 55 "
                             "bytes to it, and a file name may have 255)")
        if self.optimizer is not None and not callable(self.optimizer) and not hasattr(
            self.optimizer, "step"
        ):
            raise TypeError("optimizer must be a torch optimizer or a callable taking the "
                            f"parameters, got {type(self.optimizer).__name__}")
        check_real("weight_decay", self.weight_decay, low=0.0)
        check_int("accumulation_steps", self.accumulation_steps, low=1)
        self._check_batch_size_choice()
        if self.seed is not None:
            check_int("seed", self.seed, low=0)
        for name in ("use_scheduler", "use_mixed_precision", "use_augmentation",
                     "restore_best_weights", "check_stability", "tensorboard", "verbose",
                     "handle_signals", "recovery", "ema_warmup", "eval_ema"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        check_choice("scheduler_type", self.scheduler_type, SCHEDULER_TYPES)
        check_int("plateau_patience", self.plateau_patience, low=0)
        if self.T_max is not None:
            check_int("T_max", self.T_max, low=1)
        check_int("step_size", self.step_size, low=1)
        check_int("warmup_steps", self.warmup_steps, low=0)
        if self.gradient_clip is not None:
            check_real("gradient_clip", self.gradient_clip, low=0.0, low_inclusive=False,
                       allow_inf=True)
        if self.amp_dtype is not None:
            check_choice("amp_dtype", self.amp_dtype, AMP_DTYPES)
        if self.augment is not None and not callable(self.augment):
            check_choice("augment", self.augment, AUGMENT_MODALITIES)
        self._check_mixing()
        if self.class_weights is not None:
            check_choice("class_weights", self.class_weights, CLASS_WEIGHT_MODES)
        if self.sampler is not None:
            check_choice("sampler", self.sampler, SAMPLER_MODES)
        if self.early_stop_patience is not None:
            check_int("early_stop_patience", self.early_stop_patience, low=1)
        check_real("min_delta", self.min_delta, low=0.0)
        check_int("stability_every", self.stability_every, low=1)
        if self.on_epoch_end is not None and not callable(self.on_epoch_end):
            raise TypeError("on_epoch_end must be a callable taking the epoch's history row "
                            f"(returning True to stop) or None, got {self.on_epoch_end!r}")
        if self.metrics_file is not None and not isinstance(self.metrics_file, (str, Path)):
            raise TypeError(f"metrics_file must be a path or None, got {self.metrics_file!r}")
        if self.checkpoint_every_n_steps is not None:
            check_int("checkpoint_every_n_steps", self.checkpoint_every_n_steps, low=1)
        check_int("keep_last", self.keep_last, low=1)
        if self.spike_factor is not None:
            check_real("spike_factor", self.spike_factor, low=1.0, low_inclusive=False)
        check_int("spike_window", self.spike_window, low=2)
        check_int("rollback_after", self.rollback_after, low=1)
        check_real("rollback_lr_factor", self.rollback_lr_factor, low=0.0, high=1.0,
                   low_inclusive=False, high_inclusive=False)
        check_int("max_rollbacks", self.max_rollbacks, low=0)
        check_real("divergence_factor", self.divergence_factor, low=1.0, low_inclusive=False)
        check_real("dist_timeout", self.dist_timeout, low=0.0, low_inclusive=False)
        if self.recovery_check_every is not None:
            check_int("recovery_check_every", self.recovery_check_every, low=1)
        if not isinstance(self.resume, (bool, str, Path)):
            raise TypeError(f"resume must be a bool or a path, got {self.resume!r}")
        self._check_averaging()
        self._check_scheduler()
        check_choice("mode", self.mode, MODES)
        self._check_monitor(self._check_metrics())
        self._check_augment_options()
        check_compile_options(self.compile, self.compile_options)

    def _check_averaging(self) -> None:
        """``ema_decay`` in (0, 1) or None, ``swa_start`` an epoch of the run or None;
        ``eval_ema`` needs one of them."""
        if self.ema_decay is not None:
            with _off_is_none("ema_decay"):
                check_real("ema_decay", self.ema_decay, low=0.0, high=1.0, low_inclusive=False,
                           high_inclusive=False)
        if self.swa_start is not None:
            with _off_is_none("swa_start"):
                check_int("swa_start", self.swa_start, low=1)
            if self.swa_start > self.epochs:
                raise ValueError(f"swa_start must be an epoch of the run, 1 to epochs={self.epochs}"
                                 f" (SWA averages from that epoch's end on), got {self.swa_start}")
        if self.eval_ema and self.ema_decay is None and self.swa_start is None:
            raise ValueError("eval_ema=True evaluates the averaged weights: it needs "
                             "ema_decay= (e.g. 0.999) or swa_start= (an epoch)")

    def _check_batch_size_choice(self) -> None:
        """``batch_size_choice``: None, or a finder's record whose micro-batch times
        accumulation is its target and whose accumulation is ``accumulation_steps``."""
        choice = self.batch_size_choice
        if choice is None:
            return
        keys = ("micro_batch_size", "accumulation_steps", "target_batch_size")
        if not isinstance(choice, dict) or any(k not in choice for k in keys):
            raise TypeError(f"batch_size_choice must be None or a dict with {', '.join(keys)} "
                            f"(BatchSizeResult.record()), got {choice!r}")
        micro, accum, target = (check_int(f"batch_size_choice[{k!r}]", choice[k], low=1)
                                for k in keys)
        if micro * accum != target:
            raise ValueError(f"batch_size_choice={choice!r}: micro_batch_size x "
                             f"accumulation_steps = {micro * accum}, not target_batch_size "
                             f"{target}")
        if accum != self.accumulation_steps:
            raise ValueError(f"batch_size_choice has accumulation_steps={accum} but "
                             f"accumulation_steps={self.accumulation_steps}: pass "
                             f"accumulation_steps={accum} (micro-batch {micro} x {accum} keeps "
                             f"the effective batch {target})")

    def _check_scheduler(self) -> None:
        """Build the scheduler once on a throwaway optimizer, so that its own checks of
        ``factor``, ``gamma``, ``min_lr``, ``max_lr``, ``pct_start``... run now, before any data
        is loaded (one set of rules: the scheduler's). The number of batches is not known yet:
        the check assumes enough of them for any warmup, and the run checks the real horizon."""
        import torch

        from ..scheduler import LearningRateScheduler

        for name in ("factor", "gamma", "max_lr"):
            if getattr(self, name) is not None:
                check_real(name, getattr(self, name))
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=self.learning_rate)
        steps_per_epoch = self.warmup_steps + 2  # onecycle: room for warmup + 1 annealing step
        LearningRateScheduler(opt, self.scheduler_type, **self.scheduler_options(steps_per_epoch))

    def _check_metrics(self) -> EpochMetrics:
        """Resolve ``metrics`` once: unknown names and other objects are refused now."""
        return resolve_metrics(self.metrics)

    def _check_monitor(self, metrics: EpochMetrics) -> None:
        """``monitor`` must be a key the run logs: ``val_loss``, ``train_loss``, or ``val_``
        and a key of the configured metrics."""
        if not isinstance(self.monitor, str):
            raise TypeError(f"monitor must be a str, got {self.monitor!r}")
        key = self.monitor
        if key in ("val_loss", "train_loss") or (
                key.startswith("val_") and metrics.may_report(key[len("val_"):])):
            return
        known = ["val_loss", "train_loss", *(f"val_{k}" for k in metrics.keys())]
        if any(isinstance(m, ClassificationStats) and "per_class_recall" in m.report
               for m in metrics.members):
            known.append("val_recall_<class>")
        raise ValueError(f"monitor must be a key the run logs, one of {', '.join(known)}; got "
                         f"{key!r}" + ("" if metrics.keys() else
                                       " (add the metric to metrics= to monitor it)"))

    def _check_mixing(self) -> None:
        """``augment_targets`` (a callable ``augment`` then takes ``(inputs, targets)``; refused
        with a built-in modality), the alphas (> 0 or None) and ``label_smoothing`` in [0, 1)."""
        if not isinstance(self.augment_targets, bool):
            raise TypeError(f"augment_targets must be a bool, got {self.augment_targets!r}")
        if self.augment_targets and isinstance(self.augment, str):  # a built-in: inputs only
            raise ValueError("augment_targets=True needs a callable augment= taking and returning "
                             f"(inputs, targets); got augment={self.augment!r}")
        for name in ("mixup_alpha", "cutmix_alpha"):
            if getattr(self, name) is not None:
                with _off_is_none(name):
                    check_real(name, getattr(self, name), low=0.0, low_inclusive=False)
        check_real("label_smoothing", self.label_smoothing, low=0.0, high=1.0,
                   high_inclusive=False)

    def _check_augment_options(self) -> None:
        """Check ``augment_options`` against the built-in augmentation they will be passed to.

        With ``augment=None`` (inferred from the data) they must fit at least one of them.
        They are keyword options of the built-in augmentations only: with a callable
        ``augment`` they are refused (bind the options into the callable).
        """
        opts = self.augment_options
        if not isinstance(opts, dict):
            raise TypeError(f"augment_options must be a dict, got {opts!r}")
        if not opts:
            return
        if callable(self.augment):
            raise ValueError(f"augment_options={opts!r} apply to the built-in augmentations "
                             f"{AUGMENT_MODALITIES}, not to a callable augment; bind them into "
                             "the callable")
        errors = []
        for modality in [self.augment] if self.augment is not None else AUGMENT_MODALITIES:
            try:
                _dry_augment(modality, opts)
                return
            except (TypeError, ValueError) as e:
                errors.append(f"{modality}: {e}")
        raise ValueError(f"augment_options={opts!r} do not fit augment={self.augment!r}: "
                         + "; ".join(errors))

    def scheduler_options(self, steps_per_epoch: int) -> dict[str, Any]:
        """Keyword options for ``LearningRateScheduler`` for this run's length."""
        opts: dict[str, Any] = {
            "patience": self.plateau_patience, "mode": self.mode, "factor": self.factor,
            "gamma": self.gamma,
            "step_size": self.step_size, "min_lr": self.min_lr, "warmup_steps": self.warmup_steps,
            "T_max": self.T_max if self.T_max is not None else self.epochs,
        }
        if self.scheduler_type == "onecycle":
            opts.update(max_lr=self.max_lr if self.max_lr is not None else self.learning_rate,
                        epochs=self.epochs, steps_per_epoch=steps_per_epoch,
                        pct_start=self.pct_start)
        return opts

    def to_plain(self) -> dict[str, Any]:
        """The options as plain types (callables and objects as their repr), for checkpoints."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Path):
                v = str(v)
            elif isinstance(v, dict):
                v = {str(k): x if isinstance(x, (int, float, str, bool, type(None))) else repr(x)
                     for k, x in v.items()}
            elif not isinstance(v, (int, float, str, bool, type(None))):
                v = repr(v) if not isinstance(v, Callable) else getattr(v, "__name__", repr(v))
            out[f.name] = v
        return out


#: The built-in augmentation of each modality and a tiny input it accepts.
_AUGMENT_METHODS = {"audio": ("augment_audio_features", (2, 4, 8)),
                    "emotion": ("augment_emotion_embedding", (2, 3)),
                    "notes": ("augment_note_probabilities", (2, 128))}


@contextlib.contextmanager
def _off_is_none(name: str) -> Iterator[None]:
    """A bad value of an option that is off by default: the message also says how to turn it
    off (a grid or a search space writing 0 for 'off' is told the value that means it)."""
    try:
        yield
    except ValueError as e:
        raise ValueError(f"{e} ({name}=None, null in YAML or --set, turns it off)") from None


def _dry_augment(modality: str, options: dict[str, Any]) -> None:
    """Call the ``modality`` augmentation once on a tiny zero tensor with ``options``, so that
    its own argument checks run (unknown keys are named with the valid ones)."""
    import torch

    from ..augmentation import DataAugmentation

    method, shape = _AUGMENT_METHODS[modality]
    fn = getattr(DataAugmentation(seed=0), method)
    valid = list(inspect.signature(fn).parameters)[1:]  # after the input tensor
    unknown = sorted(set(map(str, options)) - set(valid))
    if unknown:
        raise TypeError(f"unknown option(s) {', '.join(unknown)}; valid: {', '.join(valid)}")
    fast = {"exact_noise": True} if "exact_noise" in valid else {}  # no noise bank to draw
    fn(torch.zeros(shape), **{**options, **fast})


def _check_device(device: Any) -> str:
    from .prepare import check_device  # prepare builds on this module: import when used

    return check_device(device)

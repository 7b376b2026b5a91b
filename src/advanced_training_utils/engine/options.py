"""The typed door of ``train_model_advanced``: :class:`TrainOptions`, one key per option.

``train_model_advanced(model, train_loader, val_loader, criterion, **options)`` keeps the
guide's call shape (``epochs=50, ...``, ``**get_preset('stable')``); its ``**options`` are typed
``Unpack[TrainOptions]`` so that an IDE or a type checker completes the option names and checks
their values (a misspelt name, ``scheduler_type='cosin'``, ``amp_dtype='fp16'``). At run time
:meth:`TrainConfig.from_options <.config.TrainConfig.from_options>` checks the same things and
more (ranges, combinations) before anything else happens.

The keys and their types are :class:`~.config.TrainConfig`'s fields and annotations, the string
choices are ``Literal`` types, and the tuples of allowed values the run-time checks use are
read from them (``typing.get_args``): ``tests/test_options.py`` holds the three equal.

Example:
    >>> from typing import get_args
    >>> get_args(SchedulerType)
    ('plateau', 'cosine', 'step', 'exp', 'onecycle')
    >>> opts: TrainOptions = {"epochs": 3, "scheduler_type": "cosine"}
    >>> sorted(opts)
    ['epochs', 'scheduler_type']
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypedDict

import torch

from .record import HistoryRow

if sys.version_info >= (3, 11):
    from typing import Unpack
else:  # pragma: no cover - Python 3.10: typing_extensions comes with torch
    from typing_extensions import Unpack

__all__ = ["TrainOptions", "Unpack", "SchedulerType", "AmpDtype", "AugmentModality",
           "DeviceName", "Device", "MetricName", "Metrics", "Mode", "OptimizerSpec", "Augment",
           "ClassWeightsMode", "SamplerMode", "EpochCallback"]

#: ``LearningRateScheduler``'s types (``scheduler.SCHEDULER_TYPES``).
SchedulerType = Literal["plateau", "cosine", "step", "exp", "onecycle"]
#: ``amp_dtype``: ``'auto'`` (or None) is float16 on CUDA, bfloat16 elsewhere.
AmpDtype = Literal["float16", "bfloat16", "auto"]
#: The built-in augmentations (``DataAugmentation``'s three modalities).
AugmentModality = Literal["audio", "emotion", "notes"]
#: Device names; ``'cuda:N'`` and ``torch.device`` objects are accepted too.
DeviceName = Literal["auto", "cpu", "cuda", "mps", "xla"]
Device = DeviceName | str | torch.device
#: Built-in metric names (``metrics.BUILTIN_METRICS``).
MetricName = Literal["accuracy", "uar", "macro_f1", "per_class_recall", "ccc", "mae"]
#: A metric: ``(outputs, targets) -> 0-dim tensor`` (the batch mean, averaged over examples),
#: or a ``torchmetrics.Metric`` (any object with update/compute/reset: run over the epoch).
MetricFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | Any
Metrics = (MetricName | MetricFn | Sequence[MetricName | MetricFn] | Mapping[str, MetricFn]
           | None)
#: ``mode``: whether a lower (``'min'``) or higher (``'max'``) monitored value is better.
Mode = Literal["min", "max"]
#: An optimizer over the model's parameters, or a factory taking the trainable parameters.
OptimizerSpec = (torch.optim.Optimizer
                 | Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer] | None)
#: A built-in augmentation by name, or a callable ``inputs -> augmented inputs`` (with
#: ``augment_targets=True``: ``(inputs, targets) -> (inputs, targets)``).
Augment = AugmentModality | Callable[..., Any] | None
#: ``class_weights``: inverse-frequency weights for the criterion (``engine/balance.py``).
ClassWeightsMode = Literal["balanced"]
#: ``sampler``: draw each class equally often (``engine/balance.py``).
SamplerMode = Literal["balanced"]
#: ``on_epoch_end``: called with each epoch's history row (the dict the history holds) after
#: the epoch's decisions; ``True`` stops the run after this epoch's checkpoint, ``None`` or
#: ``False`` continue (any other answer is a ``TypeError``).
EpochCallback = Callable[[HistoryRow], bool | None]


class TrainOptions(TypedDict, total=False):
    """Every option of ``train_model_advanced``; see its docstring for what each one does.

    Defaults are :class:`~.config.TrainConfig`'s (they live there only).
    """

    epochs: int
    learning_rate: float
    device: Device
    checkpoint_dir: Path | str | None
    model_name: str
    optimizer: OptimizerSpec
    weight_decay: float
    accumulation_steps: int
    batch_size_choice: dict[str, Any] | None
    seed: int | None
    use_scheduler: bool
    scheduler_type: SchedulerType
    plateau_patience: int
    factor: float | None
    T_max: int | None
    gamma: float | None
    step_size: int
    min_lr: float
    max_lr: float | None
    pct_start: float | None
    warmup_steps: int
    gradient_clip: float | None
    use_mixed_precision: bool
    amp_dtype: AmpDtype | None
    use_augmentation: bool
    augment: Augment
    augment_options: dict[str, Any]
    compile: bool
    compile_options: dict[str, Any]
    augment_targets: bool
    mixup_alpha: float | None
    cutmix_alpha: float | None
    label_smoothing: float
    class_weights: ClassWeightsMode | None
    sampler: SamplerMode | None
    early_stop_patience: int | None
    min_delta: float
    restore_best_weights: bool
    check_stability: bool
    stability_every: int
    metrics: Metrics
    monitor: str
    mode: Mode
    on_epoch_end: EpochCallback | None
    checkpoint_every_n_steps: int | None
    keep_last: int
    handle_signals: bool
    recovery: bool
    spike_factor: float | None
    spike_window: int
    rollback_after: int
    rollback_lr_factor: float
    max_rollbacks: int
    divergence_factor: float
    recovery_check_every: int | None
    ema_decay: float | None
    ema_warmup: bool
    swa_start: int | None
    eval_ema: bool
    dist_timeout: float
    resume: bool | str | Path
    metrics_file: Path | str | None
    tensorboard: bool
    verbose: bool

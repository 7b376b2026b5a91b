"""How a user's corpus becomes datasets: the options of :mod:`.datasets`, validated once."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..._validate import check_choice, check_int, check_real
from .features import ON_ERROR
from .logmel import LogMel
from .normalize import NORMALIZATIONS
from .splits import SPLIT_SEED
from .targets import TASKS

__all__ = ["EVAL_CROPS", "AudioOptions"]

EVAL_CROPS = ("center", "whole")


@dataclass(frozen=True)
class AudioOptions:
    """How a corpus becomes datasets (every field has a documented default; unknown keys are a
    ``TypeError``).

    Attributes:
        features: the :class:`LogMel` (its ``sample_rate`` is the decode rate); None: speech
            defaults, ``LogMel()``.
        task: ``"auto"``, ``"classification"`` or ``"regression"`` (see :mod:`.targets`).
        crop_seconds: training length in seconds; None: the duration rule of :mod:`.framing`
            (90th percentile of training durations, rounded up to 0.1 s, capped).
        max_crop_seconds: cap for the duration rule.
        eval_crop: ``"center"`` (the centre window of the training length) or ``"whole"``.
        normalization: ``"utterance"``, ``"dataset"`` or ``"none"`` (see :mod:`.normalize`).
        on_error: ``"skip"`` or ``"raise"``.
        split_fractions: (train, val, test) shares for the grouped split without a split column.
        val_fraction: share of training items carved into val when val is missing.
        split_seed: seed of the grouped split and of the val carve-out.
        generator: draws the training crops' seed once (None: seed 0); crops then depend only
            on (seed, epoch, index), so workers and resumes agree.
        cache_dir, use_cache: feature cache location (None: default) and switch.
        allow_silent: keep all-zero clips instead of skipping them.
    """

    features: LogMel | None = None
    task: str = "auto"
    crop_seconds: float | None = None
    max_crop_seconds: float = 10.0
    eval_crop: str = "center"
    normalization: str = "utterance"
    on_error: str = "skip"
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    val_fraction: float = 0.1
    split_seed: int = SPLIT_SEED
    generator: torch.Generator | None = None
    cache_dir: str | os.PathLike[str] | None = None
    use_cache: bool = True
    allow_silent: bool = False

    def __post_init__(self) -> None:
        if self.features is not None and not isinstance(self.features, LogMel):
            raise TypeError(f"features must be a LogMel, got {type(self.features).__name__}")
        check_choice("task", self.task, TASKS)
        if self.crop_seconds is not None:
            check_real("crop_seconds", self.crop_seconds, low=0.0, low_inclusive=False)
        check_real("max_crop_seconds", self.max_crop_seconds, low=0.0, low_inclusive=False)
        check_choice("eval_crop", self.eval_crop, EVAL_CROPS)
        check_choice("normalization", self.normalization, NORMALIZATIONS)
        check_choice("on_error", self.on_error, ON_ERROR)
        if len(self.split_fractions) != 3 or abs(sum(self.split_fractions) - 1.0) > 1e-6:
            raise ValueError("split_fractions must be (train, val, test) summing to 1, got "
                             f"{self.split_fractions}")
        check_real("val_fraction", self.val_fraction, low=0.0, high=1.0, low_inclusive=False,
                   high_inclusive=False)
        check_int("split_seed", self.split_seed, low=0)
        if self.generator is not None and not isinstance(self.generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got "
                            f"{type(self.generator).__name__}")

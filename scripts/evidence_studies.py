"""The studies of ``make evidence`` (scripts/evidence.py): which configurations each one runs.

Every configuration of a task is the task's defaults, the ``stable`` preset (the library's
recommended default, the one ``make demo`` trains) and the options named in the cell, so each
cell differs from that base in the options it names only. Cells with the same options are the
same runs, shared between studies (the base appears in several of them and is trained once).

A cell is ``Cell(label, options)``: ``label`` is the row's name in the study's table,
``options`` what :func:`advanced_training_utils.app.compare.compare` takes for one configuration
(``train_model_advanced``'s options and the task's, e.g. ``train_fraction``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["AUG_POLICIES", "Cell", "FULL", "QUICK", "STUDIES", "Scale", "Study", "UNSTABLE_LR",
           "base_options", "observed_clip"]


@dataclass(frozen=True)
class Scale:
    """How big the evidence runs are: seeds per cell, epochs (equal inside a study),
    ``per_piece`` (emotion clips per chorale), the training fractions and parallel jobs."""

    seeds: int
    epochs: int
    notes_epochs: int
    per_piece: int
    fractions: tuple[float, ...]
    jobs: int


#: ``make evidence``: 3 seeds; sized to finish in about 25 minutes on 2 quiet cores.
FULL = Scale(seeds=3, epochs=8, notes_epochs=12, per_piece=3, fractions=(0.1, 0.3, 1.0), jobs=2)
#: ``--quick``: a smoke run of the machinery (1 seed, 2 epochs, tiny data); numbers meaningless.
QUICK = Scale(seeds=1, epochs=2, notes_epochs=2, per_piece=1, fractions=(0.3, 1.0), jobs=1)


@dataclass(frozen=True)
class Cell:
    """One configuration of a study: its table label and its options over the base."""

    label: str
    options: dict[str, Any]


@dataclass(frozen=True)
class Study:
    """One study: its task, a description, and its cells.

    ``cells(scale, ctx)`` returns the cells; ``ctx`` holds what earlier phases measured
    (``steps_per_epoch``; the clipping study's ``observed_clip``). ``phases`` > 1 marks a
    study whose later cells depend on its first cells' results (``cells`` is called with
    ``ctx['phase']`` = 1, 2, ...). ``needs`` names options whose cells are skipped (and said so)
    when ``train_model_advanced`` does not have them yet.
    """

    name: str
    title: str
    task: str
    what: str
    cells: Callable[[Scale, dict[str, Any]], list[Cell]]
    phases: int = 1
    needs: dict[str, str] = field(default_factory=dict)  # option -> the feature's name
    with_target: bool = False  # report epochs to a target (see scripts/evidence.py)


def _schedulers(scale: Scale, ctx: dict[str, Any]) -> list[Cell]:
    """Constant LR and the five schedulers, each without and with a one-epoch warmup."""
    steps = int(ctx.get("steps_per_epoch", 1))
    step_size = max(1, scale.epochs // 3)
    kinds: list[tuple[str, dict[str, Any], int]] = [
        ("constant", {"use_scheduler": False}, 1),
        ("plateau", {}, 1),
        ("cosine", {"scheduler_type": "cosine"}, 1),
        ("step", {"scheduler_type": "step", "step_size": step_size}, 1),
        ("exp", {"scheduler_type": "exp"}, 1),
        ("onecycle", {"scheduler_type": "onecycle"}, steps),  # per batch: one epoch of batches
    ]
    cells = []
    for name, opts, warm in kinds:
        cells.append(Cell(name, opts))
        if name == "constant":  # warmup needs a scheduler: a step schedule that never decays
            warm_opts = {"scheduler_type": "step", "step_size": 10**6, "warmup_steps": 1}
        else:
            warm_opts = {**opts, "warmup_steps": warm}
        cells.append(Cell(f"{name}+warmup", warm_opts))
    return cells


def _presets(scale: Scale, ctx: dict[str, Any]) -> list[Cell]:
    """The three presets, and stable with mixed precision (CPU: bfloat16 autocast)."""
    return [Cell("fast", {"preset": "fast"}), Cell("stable", {}),
            Cell("memory_constrained", {"preset": "memory_constrained"}),
            Cell("stable+amp(bf16)", {"use_mixed_precision": True})]


#: The augmentation policies: label -> options (the base ``stable`` preset turns augmentation
#: on with the defaults: SpecAugment-style masks plus noise at 1% of each example's std).
AUG_POLICIES: dict[str, dict[str, Any]] = {
    "none": {"use_augmentation": False},
    "masks+noise (default)": {},
    "SpecAugment SM": {"augment_options": {"policy": "SM", "noise_level": 0.0}},
    "noise 5%": {"augment_options": {"time_mask": False, "freq_mask": False,
                                     "noise_level": 0.05}},
    "mixup 0.2": {"use_augmentation": False, "mixup_alpha": 0.2},
}


def _augmentation(scale: Scale, ctx: dict[str, Any]) -> list[Cell]:
    """Each augmentation policy at each training fraction."""
    return [Cell(f"{name} @{frac:.0%}", {**opts, **({} if frac == 1.0 else
                                                    {"train_fraction": frac})})
            for frac in scale.fractions for name, opts in AUG_POLICIES.items()]


#: The unstable configuration: the emotion task's learning rate (3e-3) times 10.
UNSTABLE_LR = 3e-2


def observed_clip(grad_norm_max: list[float]) -> float:
    """The clipping threshold set from the observed norms: the median of the per-epoch maximum
    pre-clip gradient norms of the unclipped stable runs (all epochs, all seeds), to two
    significant digits. It clips the largest steps of a typical epoch and leaves the rest."""
    vals = sorted(v for v in grad_norm_max if math.isfinite(v))
    if not vals:
        raise ValueError("no finite gradient norm to set the threshold from")
    mid = len(vals) // 2
    med = vals[mid] if len(vals) % 2 else (vals[mid - 1] + vals[mid]) / 2
    return float(f"{med:.2g}")


def _clipping(scale: Scale, ctx: dict[str, Any]) -> list[Cell]:
    """None, 1.0 (the default) and the observed threshold (phase 2), at the task's LR and at
    10x, each with divergence recovery (the default) and without."""
    clips: list[tuple[str, float | None]] = [("none", None), ("1.0", 1.0)]
    if ctx.get("phase", 1) >= 2:
        clips.append((f"observed {ctx['observed_clip']:g}", ctx["observed_clip"]))
    cells = []
    for lr_name, lr in (("lr 3e-3", {}), ("lr 3e-2", {"learning_rate": UNSTABLE_LR})):
        for clip_name, clip in clips:
            for rec_name, rec in (("recovery", {}), ("no recovery", {"recovery": False})):
                opts = {**lr, **rec, **({} if clip == 1.0 else {"gradient_clip": clip})}
                cells.append(Cell(f"{lr_name}, clip {clip_name}, {rec_name}", opts))
    return cells


def _ema(scale: Scale, ctx: dict[str, Any]) -> list[Cell]:
    """No EMA against an EMA of the weights (validated and kept on the averaged weights)."""
    return [Cell("no EMA", {}),
            Cell("EMA 0.99", {"ema_decay": 0.99, "eval_ema": True})]


def _notes(scale: Scale, ctx: dict[str, Any]) -> list[Cell]:
    """Schedulers (with the preset's augmentation) and augmentation (with plateau)."""
    return [Cell("plateau, noise (stable)", {}),
            Cell("plateau, no augmentation", {"use_augmentation": False}),
            Cell("plateau, noise 0.1", {"augment_options": {"noise_level": 0.1}}),
            Cell("constant, noise", {"use_scheduler": False}),
            Cell("cosine, noise", {"scheduler_type": "cosine"}),
            Cell("onecycle, noise", {"scheduler_type": "onecycle"})]


STUDIES: dict[str, Study] = {s.name: s for s in [
    Study("schedulers", "Schedulers, with and without warmup", "emotion",
          "constant LR and each scheduler at the same epoch budget; warmup is one epoch (for "
          "onecycle, one epoch of batches sets the length of its rise); step halves the LR "
          "every third of the budget; the rest take their defaults.", _schedulers, with_target=True),
    Study("presets", "Presets", "emotion",
          "the three presets as `advtrain train --preset` gives them, and stable with mixed "
          "precision (on this CPU: bfloat16 autocast; the GPU figures are measured apart).",
          _presets),
    Study("augmentation", "Augmentation at 10/30/100% of the training data", "emotion",
          "training on a seeded subset of the training melodies (validation and test "
          "untouched); gap = validation loss - training loss at the kept epoch (the training "
          "loss is on augmented or mixed inputs).", _augmentation,
          needs={"mixup_alpha": "mixup"}),
    Study("clipping", "Gradient clipping, stable and unstable", "emotion",
          "no clipping, the default 1.0 and a threshold set from the observed norms (the "
          "median per-epoch maximum pre-clip norm of the unclipped stable runs), at the "
          "task's learning rate 3e-3 and at 10x (3e-2), with divergence recovery (the default) "
          "and without.", _clipping, phases=2),
    Study("ema", "EMA of the weights", "emotion",
          "the stable preset without and with an exponential moving average of the weights "
          "(decay 0.99; validation and the kept epoch on the averaged weights).", _ema,
          needs={"ema_decay": "EMA"}),
    Study("notes", "Notes task: schedulers and augmentation", "notes",
          "emotion embedding -> note probabilities; held-out BCE (lower is better); "
          "augmentation is noise on the embeddings (0.05 by default).", _notes,
          with_target=True),
]}


def base_options(scale: Scale, task: str) -> dict[str, Any]:
    """The options every cell of ``task`` adds to its own (the ``stable`` preset is compare's
    default preset)."""
    return {"per_piece": scale.per_piece} if task == "emotion" else {}

"""Apply the user's guide's troubleshooting advice to a training history.

Each rule looks at the per-epoch history that ``train_model_advanced`` returns (or the lines of
``metrics.jsonl``) and, when it fires, returns a :class:`Finding` citing the epochs and numbers
behind it together with the guide's remedy. A history where no rule fires is reported healthy.

Rules and thresholds (all per epoch; epochs are 1-based):

- ``diverging``: a non-finite train/val loss, or a final train loss above 1.5x its minimum.
- ``overfitting``: val loss rose 10%+ above its best while train loss kept falling, with at least
  3 epochs after the best; or a final val/train loss ratio above 2 (train loss > 0.01).
- ``plateau``: over the last 5+ epochs the best val loss improved by less than 1% while the LR
  never changed.
- ``exploding_gradients``: an epoch's max grad norm above 10x the median epoch-mean norm and
  above 10, or the epoch-mean grad norm growing to 10x+ its first-epoch value.
- ``vanishing_gradients``: mean grad norm below 1e-5 in any epoch after the first.
- ``skipped_steps``: steps skipped for NaN/Inf loss or gradients (or loss spikes).
- ``rollbacks``: divergence recovery restored a snapshot and lowered the LR.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ...engine.record import HistoryRow

__all__ = ["Finding", "diagnose", "format_diagnosis", "REMEDIES", "MEASURED"]

#: The guide's remedies, by finding.
REMEDIES: dict[str, list[str]] = {
    "diverging": ["reduce the learning rate", "enable gradient clipping (max_norm=1.0)",
                  "disable mixed precision", "check for NaN/Inf with the stability checks"],
    "overfitting": ["increase data augmentation", "use the plateau scheduler",
                    "increase early stopping patience (and keep the best weights)"],
    "plateau": ["use the plateau scheduler, which lowers the LR when progress stalls",
                "try the OneCycle scheduler for faster convergence"],
    "exploding_gradients": ["enable gradient clipping (max_norm=1.0)",
                            "reduce the learning rate"],
    "vanishing_gradients": ["check gradients with TrainingStability.check_gradients "
                            "(it lists parameters without gradients)",
                            "raise the learning rate or add warmup"],
    "rollbacks": ["reduce the learning rate (recovery had to lower it)",
                  "enable gradient clipping (max_norm=1.0)",
                  "check for NaN/Inf with the stability checks"],
    "skipped_steps": ["disable mixed precision if fp16 overflows persist",
                      "enable gradient clipping (max_norm=1.0)", "reduce the learning rate",
                      "check for NaN/Inf in the inputs with the stability checks"],
}

#: What ``make evidence`` measured about a finding's remedies on the built-in emotion task
#: (``benchmarks/results/evidence.md``, 3 seeds per cell); :func:`format_diagnosis` prints it
#: under the remedies. Findings without an entry were not measured.
MEASURED: dict[str, str] = {
    "overfitting": "augmentation study (benchmarks/results/evidence.md): on the built-in "
                   "emotion task no augmentation policy (masks+noise, SpecAugment SM, noise, "
                   "mixup) separated from none in held-out accuracy at 10%, 30% or 100% of the "
                   "data",
    "plateau": "schedulers study (benchmarks/results/evidence.md): in an 8-epoch budget the "
               "plateau scheduler (patience 5) never lowered the LR, so it trained exactly as a "
               "constant LR; cosine and onecycle ended lower, intervals overlapping",
    "diverging": "clipping study (benchmarks/results/evidence.md): at 10x the learning rate "
                 "clipping at 1.0 raised the mean held-out accuracy, intervals overlapping",
    "exploding_gradients": "clipping study (benchmarks/results/evidence.md): at 10x the "
                           "learning rate clipping at 1.0 raised the mean held-out accuracy, "
                           "intervals overlapping; at the task's LR it clips every step",
    "rollbacks": "clipping study (benchmarks/results/evidence.md): at 10x the learning rate "
                 "recovery never had to act; clipping at 1.0 raised the mean held-out accuracy",
}


@dataclass(frozen=True)
class Finding:
    """One diagnosed problem: its kind, the evidence (epochs, numbers) and the remedies."""

    kind: str
    evidence: str
    epochs: tuple[int, ...]
    remedies: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.kind}: {self.evidence} -> " + "; ".join(self.remedies)


def _f(x: Any) -> float:
    return float("nan") if x is None else float(x)


def _clip_remedy(c: dict[str, Any]) -> str:
    clip = c.get("gradient_clip")
    if clip in (None, "None") or (isinstance(clip, (int, float)) and math.isinf(clip)):
        return "enable gradient clipping (max_norm=1.0)"
    return f"gradient clipping is on (max_norm={clip}): lower max_norm"


def _uses(c: dict[str, Any], scheduler_type: str) -> bool:
    return bool(c.get("use_scheduler")) and c.get("scheduler_type") == scheduler_type


def _early_stopping_remedy(c: dict[str, Any], fired: bool) -> str | None:
    patience = c.get("early_stop_patience")
    if patience is None:
        return "enable early stopping (early_stop_patience) and keep the best weights"
    keep = "keep the best weights (restore_best_weights=True)"
    if fired:  # it stopped the run where it should; only the weights kept can be wrong
        return None if c.get("restore_best_weights") else keep
    lower = f"lower early_stop_patience (now {patience}): it never fired"
    return lower if c.get("restore_best_weights") else f"{lower}; {keep}"


def _plateau_remedy(c: dict[str, Any], last_lr: float) -> str:
    if not _uses(c, "plateau"):
        return "use the plateau scheduler, which lowers the LR when progress stalls"
    min_lr = float(c.get("min_lr") or 0.0)
    if math.isfinite(last_lr) and last_lr <= min_lr * (1 + 1e-9):
        return f"the LR is at min_lr ({min_lr:g}): lower min_lr"
    return (f"lower the plateau scheduler's patience (now {_plateau_patience(c)}) so it acts "
            "sooner")


def _plateau_patience(c: dict[str, Any]) -> Any:
    """``plateau_patience``; runs saved before the rename called it ``patience``."""
    return c.get("plateau_patience", c.get("patience"))


def _patience_remedy(c: dict[str, Any], fired: bool) -> str | None:
    """Early stopping that fired before the plateau scheduler could lower the LR."""
    stop, patience = c.get("early_stop_patience"), _plateau_patience(c)
    if not (fired and _uses(c, "plateau") and stop is not None and patience is not None
            and stop <= patience):
        return None
    return (f"increase early_stop_patience (now {stop}) above the plateau scheduler's patience "
            f"({patience}) so the LR can drop before the run stops")


def _tailored(kind: str, c: dict[str, Any], fired: bool, last_lr: float) -> list[str | None]:
    """The remedies of ``kind`` for a run with options ``c``; None where one does not apply."""
    checks = bool(c.get("check_stability"))
    amp = bool(c.get("use_mixed_precision"))
    if kind == "diverging":
        return ["reduce the learning rate", _clip_remedy(c),
                "disable mixed precision" if amp else None,
                None if checks else REMEDIES[kind][3]]
    if kind == "overfitting":
        return ["increase data augmentation" if c.get("use_augmentation")
                else "enable data augmentation (use_augmentation=True)",
                None if _uses(c, "plateau") else "use the plateau scheduler",
                _early_stopping_remedy(c, fired)]
    if kind == "plateau":
        return [_plateau_remedy(c, last_lr), _patience_remedy(c, fired),
                None if _uses(c, "onecycle") else REMEDIES[kind][1]]
    if kind == "exploding_gradients":
        return [_clip_remedy(c), "reduce the learning rate"]
    if kind == "vanishing_gradients":
        return [None if checks else REMEDIES[kind][0],
                "raise the learning rate" if c.get("warmup_steps") else REMEDIES[kind][1]]
    if kind == "rollbacks":
        return [REMEDIES[kind][0], _clip_remedy(c), None if checks else REMEDIES[kind][2]]
    return ["disable mixed precision if fp16 overflows persist" if amp else None,  # skipped
            _clip_remedy(c), "reduce the learning rate", None if checks else REMEDIES[kind][3]]


def _config_with_defaults(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` over :class:`TrainConfig`'s defaults (a partial config omits defaults)."""
    import dataclasses

    from ...engine.config import TrainConfig

    out = {f.name: f.default for f in dataclasses.fields(TrainConfig)
           if f.default is not dataclasses.MISSING}
    out.update(config)
    return out


def _stopped_early(history: Sequence[HistoryRow], c: dict[str, Any]) -> bool:
    """Whether early stopping ended the run, read from the history: it ended before its last
    epoch, after ``early_stop_patience`` epochs in a row without improvement."""
    p = c.get("early_stop_patience")
    if p is None or len(history) >= int(c.get("epochs") or 0) or len(history) < int(p):
        return False
    return all(h.get("improved") is False for h in history[-int(p):])


def _remedies(kind: str, config: dict[str, Any] | None, fired: bool = False,
              last_lr: float = math.nan) -> tuple[str, ...]:
    """The guide's remedies; with the run's config, only those that apply to it."""
    if not config:
        return tuple(REMEDIES[kind])
    return tuple(r for r in _tailored(kind, config, fired, last_lr) if r)


def diagnose(history: Sequence[HistoryRow], config: dict[str, Any] | None = None, *,
             stopped_early: bool | None = None) -> list[Finding]:
    """Findings for ``history`` (a list of per-epoch dicts); empty when the run looks healthy.

    ``config`` (the run's options, e.g. ``summary.json['options']`` or a checkpoint's
    ``config``; omitted keys take ``TrainConfig``'s defaults) keeps only the remedies that apply
    to the run: one that already clips is told to lower max_norm, not to enable clipping; one
    on the plateau scheduler is not told to use it; patience advice depends on whether early
    stopping is on and fired (``stopped_early``; inferred from the history when None). Without
    ``config`` the guide's generic remedies (:data:`REMEDIES`) are given.
    """
    if not history:
        return []
    cfg = _config_with_defaults(config) if config else None
    fired = bool(stopped_early) if stopped_early is not None else bool(
        cfg and _stopped_early(history, cfg))
    last_lr = _f(history[-1].get("lr"))
    cols = _Columns.of(history)
    found = (_diverging(cols) + _overfitting(cols) + _plateau(history, cols)
             + _gradients(history, cols) + _recovery(history, cols))
    return [Finding(kind, evidence, tuple(epochs), _remedies(kind, cfg, fired, last_lr))
            for kind, evidence, epochs in found]


_Raw = list[tuple[str, str, list[int]]]  # (kind, evidence, epochs) of the findings of a rule


@dataclass(frozen=True)
class _Columns:
    """The history's epochs and losses as columns (None read as NaN)."""

    ep: list[int]
    tr: list[float]
    va: list[float]
    has_val: bool

    @classmethod
    def of(cls, history: Sequence[HistoryRow]) -> _Columns:
        va = [_f(h.get("val_loss")) for h in history]
        return cls([int(h["epoch"]) for h in history], [_f(h.get("train_loss")) for h in history],
                   va, any(math.isfinite(v) for v in va))


def _diverging(c: _Columns) -> _Raw:
    """A non-finite loss, or a final train loss above 1.5x its minimum."""
    ep, tr, va = c.ep, c.tr, c.va
    bad = [e for e, t, v in zip(ep, tr, va)
           if not math.isfinite(t) or (c.has_val and not math.isfinite(v))]
    finite_tr = [(e, t) for e, t in zip(ep, tr) if math.isfinite(t)]
    if bad:
        return [("diverging", f"non-finite loss in epoch(s) {_list(bad)}", bad)]
    if finite_tr:
        e_min, t_min = min(finite_tr, key=lambda x: x[1])
        if tr[-1] > 1.5 * t_min and tr[-1] - t_min > 1e-3:
            return [("diverging", f"train loss rose from {t_min:.4g} (epoch {e_min}) to "
                     f"{tr[-1]:.4g} (epoch {ep[-1]})", [e_min, ep[-1]])]
    return []


def _overfitting(c: _Columns) -> _Raw:
    """Val loss 10%+ above its best while train loss fell (3+ epochs after the best), or a
    final val/train ratio above 2."""
    if not c.has_val:
        return []
    ep, tr, va = c.ep, c.tr, c.va
    finite_va = [(e, v, t) for e, v, t in zip(ep, va, tr) if math.isfinite(v)]
    e_best, v_best, t_best = min(finite_va, key=lambda x: x[1])
    after = [x for x in finite_va if x[0] > e_best]
    if len(after) >= 3 and after[-1][1] > 1.1 * v_best and after[-1][2] < t_best:
        return [("overfitting", f"val loss rose from {v_best:.4g} (epoch {e_best}) to "
                 f"{after[-1][1]:.4g} (epoch {after[-1][0]}) while train loss fell from "
                 f"{t_best:.4g} to {after[-1][2]:.4g}", [e_best, after[-1][0]])]
    if math.isfinite(va[-1]) and math.isfinite(tr[-1]) and tr[-1] > 0.01 and va[-1] > 2 * tr[-1]:
        return [("overfitting", f"at epoch {ep[-1]} val loss {va[-1]:.4g} is "
                 f"{va[-1] / tr[-1]:.1f}x the train loss {tr[-1]:.4g}", [ep[-1]])]
    return []


def _plateau(history: Sequence[HistoryRow], c: _Columns) -> _Raw:
    """Over the last 5+ epochs the best monitored loss improved <1% at a constant LR."""
    mon = c.va if c.has_val else c.tr
    if len(history) < 6:
        return []
    lrs = {_f(h.get("lr")) for h in history[-5:]}
    before = [m for m in mon[:-5] if math.isfinite(m)]
    recent = [m for m in mon[-5:] if math.isfinite(m)]
    if not (before and recent and len(lrs) == 1):
        return []
    b0, b1 = min(before), min(before + recent)
    if b0 - b1 >= 0.01 * abs(b0):
        return []
    which = "val" if c.has_val else "train"
    return [("plateau", f"best {which} loss moved from {b0:.4g} to {b1:.4g} (<1%) over epochs "
             f"{c.ep[-5]}-{c.ep[-1]} at a constant lr {lrs.pop():.3g}", c.ep[-5:])]


def _gradients(history: Sequence[HistoryRow], c: _Columns) -> _Raw:
    """Exploding (a max norm 10x the median mean, or the mean grown 10x) and vanishing norms."""
    ep, out = c.ep, []
    means = [_f(h.get("grad_norm_mean")) for h in history]
    maxes = [_f(h.get("grad_norm_max")) for h in history]
    finite_means = [m for m in means if math.isfinite(m) and m > 0]
    if finite_means:
        med = statistics.median(finite_means)
        spikes = [(e, m) for e, m in zip(ep, maxes) if math.isfinite(m) and m > 10 * med and m > 10]
        grown = [(e, m) for e, m in zip(ep[1:], means[1:])
                 if math.isfinite(m) and math.isfinite(means[0]) and means[0] > 0
                 and m > 10 * means[0]]
        if spikes:
            e, m = max(spikes, key=lambda x: x[1])
            out.append(("exploding_gradients", f"grad norm reached {m:.4g} in epoch {e}, "
                        f"{m / med:.0f}x the median epoch mean {med:.3g}", [s[0] for s in spikes]))
        elif grown:
            e, m = max(grown, key=lambda x: x[1])
            out.append(("exploding_gradients", f"mean grad norm grew from {means[0]:.3g} (epoch "
                        f"{ep[0]}) to {m:.3g} (epoch {e})", [g[0] for g in grown]))
    tiny = [(e, m) for e, m in zip(ep[1:], means[1:]) if math.isfinite(m) and m < 1e-5]
    if tiny:
        out.append(("vanishing_gradients", f"mean grad norm {tiny[0][1]:.2e} in epoch {tiny[0][0]}"
                    + (f" (and {len(tiny) - 1} more epochs)" if len(tiny) > 1 else ""),
                    [t[0] for t in tiny]))
    return out


def _recovery(history: Sequence[HistoryRow], c: _Columns) -> _Raw:
    """Rollbacks, and steps the guard skipped."""
    out: _Raw = []
    events = [(e, h["recovery_event"]) for e, h in zip(c.ep, history) if h.get("recovery_event")]
    if events:
        out.append(("rollbacks", f"{len(events)} rollback(s): " + "; ".join(
            f"epoch {e}: {d}" for e, d in events[:3]), [e for e, _ in events]))
    skipped = [(e, int(h.get("skipped_steps") or 0)) for e, h in zip(c.ep, history)
               if int(h.get("skipped_steps") or 0) > 0]
    if skipped:
        total = sum(s for _, s in skipped)
        spikes = sum(int(h.get("spike_steps") or 0) for h in history)
        why = f" ({spikes} of them loss spikes)" if spikes else ""
        out.append(("skipped_steps", f"{total} optimizer step(s) skipped for NaN/Inf{why} in "
                    f"epochs {_list([e for e, _ in skipped])}", [e for e, _ in skipped]))
    return out


def _list(epochs: Sequence[int]) -> str:
    epochs = list(epochs)
    return ", ".join(map(str, epochs[:8])) + (f" (+{len(epochs) - 8} more)" if len(epochs) > 8 else "")


def format_diagnosis(findings: Sequence[Finding], history: Sequence[HistoryRow]) -> str:
    """Readable text: one paragraph per finding, or a healthy summary."""
    if not history:
        return "No epochs recorded."
    if not findings:
        last = history[-1]
        best = min(history, key=lambda h: _f(h.get("val_loss")) if h.get("val_loss") is not None
                   else math.inf)
        return (f"Healthy run: {len(history)} epochs, no divergence, overfitting, plateau, "
                f"gradient or skipped-step problem found. Best val loss "
                f"{_f(best.get('val_loss')):.4g} at epoch {best['epoch']}; final train loss "
                f"{_f(last.get('train_loss')):.4g}.")
    lines = []
    for f in findings:
        lines.append(f"- {f.kind.replace('_', ' ')}: {f.evidence}.")
        lines.append("  remedies: " + "; ".join(f.remedies) + ".")
        if f.kind in MEASURED:
            lines.append(f"  evidence: {MEASURED[f.kind]}.")
    return "\n".join(lines)

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

__all__ = ["Finding", "diagnose", "format_diagnosis", "REMEDIES"]

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


def _remedies(kind: str, config: dict[str, Any] | None) -> tuple[str, ...]:
    """The guide's remedies, adjusted to what the run already did (when its config is known)."""
    out = []
    for r in REMEDIES[kind]:
        if config:
            clip = config.get("gradient_clip")
            if r.startswith("enable gradient clipping") and clip not in (None, "None"):
                r = f"gradient clipping is on (max_norm={clip}): lower max_norm"
            if r == "disable mixed precision" and not config.get("use_mixed_precision"):
                continue
            if r.startswith("disable mixed precision if") and not config.get("use_mixed_precision"):
                continue
        out.append(r)
    return tuple(out)


def _make(kind: str, evidence: str, epochs: Sequence[int],
          config: dict[str, Any] | None = None) -> Finding:
    return Finding(kind, evidence, tuple(epochs), _remedies(kind, config))


def diagnose(history: Sequence[dict[str, Any]],
             config: dict[str, Any] | None = None) -> list[Finding]:
    """Findings for ``history`` (a list of per-epoch dicts); empty when the run looks healthy.

    ``config`` (the run's options, e.g. ``summary.json['options']``) tailors the remedies: a
    run that already clips is told to lower the threshold, not to enable clipping.
    """
    def _finding(kind: str, evidence: str, epochs: Sequence[int]) -> Finding:
        return _make(kind, evidence, epochs, config)

    if not history:
        return []
    ep = [int(h["epoch"]) for h in history]
    tr = [_f(h.get("train_loss")) for h in history]
    va = [_f(h.get("val_loss")) for h in history]
    has_val = any(math.isfinite(v) for v in va)
    out: list[Finding] = []

    # diverging
    bad = [e for e, t, v in zip(ep, tr, va) if not math.isfinite(t) or (has_val and not math.isfinite(v))]
    finite_tr = [(e, t) for e, t in zip(ep, tr) if math.isfinite(t)]
    if bad:
        out.append(_finding("diverging", f"non-finite loss in epoch(s) {_list(bad)}", bad))
    elif finite_tr:
        e_min, t_min = min(finite_tr, key=lambda x: x[1])
        if tr[-1] > 1.5 * t_min and tr[-1] - t_min > 1e-3:
            out.append(_finding(
                "diverging", f"train loss rose from {t_min:.4g} (epoch {e_min}) to {tr[-1]:.4g} "
                f"(epoch {ep[-1]})", [e_min, ep[-1]]))

    # overfitting
    if has_val:
        finite_va = [(e, v, t) for e, v, t in zip(ep, va, tr) if math.isfinite(v)]
        e_best, v_best, t_best = min(finite_va, key=lambda x: x[1])
        after = [x for x in finite_va if x[0] > e_best]
        if len(after) >= 3 and after[-1][1] > 1.1 * v_best and after[-1][2] < t_best:
            out.append(_finding(
                "overfitting", f"val loss rose from {v_best:.4g} (epoch {e_best}) to "
                f"{after[-1][1]:.4g} (epoch {after[-1][0]}) while train loss fell from "
                f"{t_best:.4g} to {after[-1][2]:.4g}", [e_best, after[-1][0]]))
        elif math.isfinite(va[-1]) and math.isfinite(tr[-1]) and tr[-1] > 0.01 and va[-1] > 2 * tr[-1]:
            out.append(_finding(
                "overfitting", f"at epoch {ep[-1]} val loss {va[-1]:.4g} is "
                f"{va[-1] / tr[-1]:.1f}x the train loss {tr[-1]:.4g}", [ep[-1]]))

    # plateau
    mon = va if has_val else tr
    if len(history) >= 6:
        tail = history[-5:]
        lrs = {_f(h.get("lr")) for h in tail}
        before = [m for m in mon[:-5] if math.isfinite(m)]
        recent = [m for m in mon[-5:] if math.isfinite(m)]
        if before and recent and len(lrs) == 1:
            b0, b1 = min(before), min(before + recent)
            if b0 - b1 < 0.01 * abs(b0):
                which = "val" if has_val else "train"
                out.append(_finding(
                    "plateau", f"best {which} loss moved from {b0:.4g} to {b1:.4g} "
                    f"(<1%) over epochs {ep[-5]}-{ep[-1]} at a constant lr {lrs.pop():.3g}",
                    ep[-5:]))

    # gradients
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
            out.append(_finding(
                "exploding_gradients", f"grad norm reached {m:.4g} in epoch {e}, "
                f"{m / med:.0f}x the median epoch mean {med:.3g}", [s[0] for s in spikes]))
        elif grown:
            e, m = max(grown, key=lambda x: x[1])
            out.append(_finding(
                "exploding_gradients", f"mean grad norm grew from {means[0]:.3g} (epoch "
                f"{ep[0]}) to {m:.3g} (epoch {e})", [g[0] for g in grown]))
    tiny = [(e, m) for e, m in zip(ep[1:], means[1:]) if math.isfinite(m) and m < 1e-5]
    if tiny:
        out.append(_finding(
            "vanishing_gradients", f"mean grad norm {tiny[0][1]:.2e} in epoch {tiny[0][0]}"
            + (f" (and {len(tiny) - 1} more epochs)" if len(tiny) > 1 else ""),
            [t[0] for t in tiny]))

    events = [(e, h["recovery_event"]) for e, h in zip(ep, history) if h.get("recovery_event")]
    if events:
        out.append(_finding(
            "rollbacks", f"{len(events)} rollback(s): " + "; ".join(
                f"epoch {e}: {d}" for e, d in events[:3]), [e for e, _ in events]))
    skipped = [(e, int(h.get("skipped_steps") or 0)) for e, h in zip(ep, history)
               if int(h.get("skipped_steps") or 0) > 0]
    if skipped:
        total = sum(s for _, s in skipped)
        spikes = sum(int(h.get("spike_steps") or 0) for h in history)
        why = f" ({spikes} of them loss spikes)" if spikes else ""
        out.append(_finding(
            "skipped_steps", f"{total} optimizer step(s) skipped for NaN/Inf{why} in epochs "
            f"{_list([e for e, _ in skipped])}", [e for e, _ in skipped]))
    return out


def _list(epochs: Sequence[int]) -> str:
    epochs = list(epochs)
    return ", ".join(map(str, epochs[:8])) + (f" (+{len(epochs) - 8} more)" if len(epochs) > 8 else "")


def format_diagnosis(findings: Sequence[Finding], history: Sequence[dict[str, Any]]) -> str:
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
    return "\n".join(lines)

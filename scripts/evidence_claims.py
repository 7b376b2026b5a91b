"""The guide's claims, judged on the evidence runs by one stated rule (scripts/evidence.py).

The rule: a claim that A is better than B **held** when the two 95% Student-t intervals of the
mean (over the seeds) are separated in the claimed direction; it **did not hold** when they are
separated the other way; it is **not shown** when they overlap (or a side has fewer than two
runs). "A is the best" held when A's interval is separated from every other cell's in the
claimed direction, did not hold when some other cell's is separated from A's the other way. A
claim about a ratio ("2x faster") compares the interval of the per-seed ratios with the claimed
value the same way.

Separated intervals are a conservative test (two means whose intervals just overlap can still
differ at the 5% level); with 3 seeds the t factor is 4.30, so only large effects separate.

Example:
    >>> from advanced_training_utils.app.report.intervals import mean_interval
    >>> verdict(mean_interval([0.8, 0.81, 0.82]), mean_interval([0.6, 0.62, 0.61]), "higher")
    'held'
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from evidence_results import CellResult, StudyResult

from advanced_training_utils.app.report.intervals import Interval, mean_interval

__all__ = ["RULE", "HELD", "NOT_SHOWN", "DID_NOT_HOLD", "Claim", "verdict", "verdict_best",
           "verdict_value", "fmt_iv", "guide_claims", "best_against_base"]

#: The rule, as evidence.md states it.
RULE = ("Rule: a claim that A beats B **held** when the 95% intervals of the two means are "
        "separated in the claimed direction, **did not hold** when they are separated the other "
        "way, and is **not shown** when they overlap. \"Best\": held when separated from every "
        "other cell, did not hold when another cell is separated above it. A ratio claim "
        "(\"2x faster\"): the interval of the per-seed ratios against the claimed value. "
        "Separated intervals are a conservative test: with 3 seeds only large effects show.")

HELD = "held"
NOT_SHOWN = "not shown"
DID_NOT_HOLD = "did not hold"


@dataclass(frozen=True)
class Claim:
    """One guide claim: its words, the verdict, and the numbers behind it (a sentence)."""

    guide: str
    verdict: str
    evidence: str


def _usable(iv: Interval) -> bool:
    return iv.n >= 2 and math.isfinite(iv.low) and math.isfinite(iv.high)


def verdict(a: Interval, b: Interval, better: str) -> str:
    """Whether "A is better than B" held (``better``: ``'higher'`` or ``'lower'`` values are
    better), by the module's rule."""
    if better not in ("higher", "lower"):
        raise ValueError(f"better must be 'higher' or 'lower', got {better!r}")
    if not (_usable(a) and _usable(b)):
        return NOT_SHOWN
    a_above, b_above = a.low > b.high, b.low > a.high
    if better == "higher":
        return HELD if a_above else DID_NOT_HOLD if b_above else NOT_SHOWN
    return HELD if b_above else DID_NOT_HOLD if a_above else NOT_SHOWN


def verdict_best(a: Interval, others: Sequence[Interval], better: str) -> str:
    """Whether "A is the best of them all" held against ``others``."""
    verdicts = [verdict(a, o, better) for o in others]
    if not verdicts:
        return NOT_SHOWN
    if any(v == DID_NOT_HOLD for v in verdicts):
        return DID_NOT_HOLD
    return HELD if all(v == HELD for v in verdicts) else NOT_SHOWN


def verdict_value(a: Interval, value: float, better: str) -> str:
    """Whether "A is at least as good as ``value``" held (e.g. a time ratio <= 0.5 for
    "2x faster", ``better='lower'``)."""
    if not _usable(a):
        return NOT_SHOWN
    if better == "lower":
        return HELD if a.high <= value else DID_NOT_HOLD if a.low > value else NOT_SHOWN
    return HELD if a.low >= value else DID_NOT_HOLD if a.high < value else NOT_SHOWN


def fmt_iv(iv: Interval, digits: int = 4) -> str:
    """``mean [low, high]`` (``mean (1 run)`` for one value, ``n/a`` for none)."""
    if iv.n == 0 or not math.isfinite(iv.mean):
        return "n/a"
    if iv.n == 1 or not math.isfinite(iv.low):
        return f"{iv.mean:.{digits}g} (1 run)"
    return f"{iv.mean:.{digits}g} [{iv.low:.{digits}g}, {iv.high:.{digits}g}]"


# ---- the guide's claims, from the studies' results (a study not run: its claims are left out)

def _acc(c: CellResult, sr: StudyResult) -> str:
    return f"{c.cell.label} {fmt_iv(c.iv('test_value'))}"


def _better(sr: StudyResult) -> str:
    return "higher" if sr.higher_is_better else "lower"


def _plateau_best(sr: StudyResult) -> Claim | None:
    p = sr.cell("plateau")
    others = [c for c in sr.cells if c is not p and c.runs]
    if p is None or not p.runs or not others:
        return None
    ranked = sorted(others, key=lambda c: c.iv("test_value").mean, reverse=sr.higher_is_better)
    v = verdict_best(p.iv("test_value"), [c.iv("test_value") for c in others], _better(sr))
    return Claim('plateau is "best for most cases"', v,
                 f"{sr.test_name} of {_acc(p, sr)} against the other {len(others)} schedules; "
                 f"best other: {_acc(ranked[0], sr)}; worst: {_acc(ranked[-1], sr)}")


def _cosine_fixed(sr: StudyResult) -> Claim | None:
    cos, const = sr.cell("cosine"), sr.cell("constant")
    if cos is None or const is None or not cos.runs or not const.runs:
        return None
    v = verdict(cos.iv("final_value"), const.iv("final_value"), "lower")
    return Claim("cosine is good for a fixed number of epochs", v,
                 f"val_loss at the last of {sr.epochs} epochs: cosine "
                 f"{fmt_iv(cos.iv('final_value'))}, constant LR "
                 f"{fmt_iv(const.iv('final_value'))} ({sr.test_name}: {_acc(cos, sr)}; "
                 f"{_acc(const, sr)})")


def _onecycle_fastest(sr: StudyResult) -> Claim | None:
    one = sr.cell("onecycle")
    others = [c for c in sr.cells if c is not one and c.runs]
    if one is None or not one.runs or not others or sr.target is None:
        return None
    ivs = {c.cell.label: c.epochs_to(sr.target, sr.epochs) for c in others}
    fastest = min(ivs, key=lambda k: ivs[k].mean)
    mine = one.epochs_to(sr.target, sr.epochs)
    return Claim('onecycle gives the "fastest convergence"',
                 verdict_best(mine, list(ivs.values()), "lower"),
                 f"epochs to val_loss <= {sr.target:.3g} (unreached counts {sr.epochs + 1}): "
                 f"onecycle {fmt_iv(mine)} ({one.reached(sr.target)}/{len(one.runs)} reached); "
                 f"fastest other: {fastest} {fmt_iv(ivs[fastest])}")


def _ratio(a: CellResult, b: CellResult, name: str) -> Interval:
    """The interval of the per-seed ratios a/b of ``name`` (runs paired by seed)."""
    by_seed = {r.seed: e.get(name) for r, e in zip(b.runs, b.extras)}
    vals = [e.get(name) / by_seed[r.seed] for r, e in zip(a.runs, a.extras)
            if by_seed.get(r.seed) and math.isfinite(e.get(name, math.nan))
            and math.isfinite(by_seed[r.seed])]
    return mean_interval([float(v) for v in vals])


def _mixed_precision(sr: StudyResult) -> list[Claim]:
    amp, base = sr.cell("stable+amp(bf16)"), sr.cell("stable")
    if amp is None or base is None or not amp.runs or not base.runs:
        return []
    t, m = _ratio(amp, base, "s_per_epoch"), _ratio(amp, base, "peak_rss_mb")
    where = "on this CPU (bfloat16 autocast; the GPU figures are measured apart)"
    return [Claim('mixed precision is "2x faster"', verdict_value(t, 0.5, "lower"),
                  f"training time per epoch, amp / fp32: {fmt_iv(t)} {where}"),
            Claim('mixed precision uses "50% less memory"', verdict_value(m, 0.5, "lower"),
                  f"peak resident memory of the run's process, amp / fp32: {fmt_iv(m)} "
                  f"{where}")]


def _augmentation_small(sr: StudyResult) -> Claim | None:
    fracs = sorted({c.cell.label.rsplit("@", 1)[1] for c in sr.cells if "@" in c.cell.label},
                   key=lambda f: float(f.rstrip("%")))
    if not fracs:
        return None
    small = fracs[0]
    aug, none = sr.cell(f"masks+noise (default) @{small}"), sr.cell(f"none @{small}")
    if aug is None or none is None or not aug.runs or not none.runs:
        return None
    v = verdict(aug.iv("test_value"), none.iv("test_value"), _better(sr))
    others = [c for c in sr.cells if c.cell.label.endswith(f"@{small}") and c not in (aug, none)
              and c.runs]
    base = none.iv("test_value")
    more = "; ".join(f"{_acc(c, sr)} ({verdict(c.iv('test_value'), base, _better(sr))})"
                     for c in others)
    return Claim("augmentation helps small datasets", v,
                 f"{sr.test_name} at {small} of the training data: {_acc(aug, sr)} against "
                 f"{_acc(none, sr)}" + (f"; others against none: {more}" if more else ""))


def _clipping_unstable(sr: StudyResult) -> list[Claim]:
    out = []
    for rec in ("no recovery", "recovery"):
        clip = sr.cell(f"lr 3e-2, clip 1.0, {rec}")
        none = sr.cell(f"lr 3e-2, clip none, {rec}")
        if clip is None or none is None or not clip.runs or not none.runs:
            continue
        v = verdict(clip.iv("test_value"), none.iv("test_value"), _better(sr))
        out.append(Claim(f"clipping tames unstable training ({rec})", v,
                         f"{sr.test_name} at 10x the learning rate: clip 1.0 "
                         f"{fmt_iv(clip.iv('test_value'))}, no clipping "
                         f"{fmt_iv(none.iv('test_value'))}; finished runs "
                         f"{len(clip.runs)}/{clip.planned} and {len(none.runs)}/{none.planned}"))
    return out


def guide_claims(results: dict[str, StudyResult]) -> list[Claim]:
    """Every guide claim whose study is in ``results``, judged by the module's rule."""
    out: list[Claim | None] = []
    if "schedulers" in results:
        sr = results["schedulers"]
        out += [_plateau_best(sr), _cosine_fixed(sr), _onecycle_fastest(sr)]
    if "presets" in results:
        out += _mixed_precision(results["presets"])
    if "augmentation" in results:
        out.append(_augmentation_small(results["augmentation"]))
    if "clipping" in results:
        out += _clipping_unstable(results["clipping"])
    return [c for c in out if c is not None]


def best_against_base(sr: StudyResult, base: str) -> str:
    """One sentence: the study's best cell on its test metric against the ``base`` cell."""
    b = sr.cell(base)
    ran = [c for c in sr.cells if c.runs]
    if b is None or not b.runs or not ran:
        return f"{sr.name}: no base cell {base!r} to compare with"
    sign = 1 if sr.higher_is_better else -1
    best = max(ran, key=lambda c: sign * c.iv("test_value").mean)
    if best is b:
        return f"the base ({base}) has the best mean {sr.test_name}: {_acc(b, sr)}"
    v = verdict(best.iv("test_value"), b.iv("test_value"), _better(sr))
    return (f"best mean {sr.test_name}: {_acc(best, sr)} against the base {_acc(b, sr)}: "
            + ("separated (the evidence supports the change)" if v == HELD
               else "intervals overlap (no change supported)"))

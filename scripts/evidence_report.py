"""The evidence's Markdown and plots (scripts/evidence.py), written from the studies' results.

Every sentence with a number is generated here from the runs, so a rerun rewrites the whole
file consistently; nothing in ``evidence.md`` is typed by hand.
"""

from __future__ import annotations

import math
import platform
from pathlib import Path
from typing import Any

from evidence_claims import RULE, Claim, best_against_base
from evidence_results import CellResult, StudyResult

from advanced_training_utils.app.report.comparison import plot_curves
from advanced_training_utils.app.report.intervals import Interval

__all__ = ["study_table", "write_markdown", "write_plots", "BASES"]

#: Each study's base cell: the stable preset as the study varies it.
BASES = {"schedulers": "plateau", "presets": "stable",
         "augmentation": "masks+noise (default) @100%", "clipping": "lr 3e-3, clip 1.0, recovery",
         "ema": "no EMA", "notes": "plateau, noise (stable)"}


def _cell(iv: Interval, digits: int = 4) -> str:
    if iv.n == 0 or not math.isfinite(iv.mean):
        return "n/a"
    if iv.n == 1:
        return f"{iv.mean:.{digits}g}"
    return f"{iv.mean:.{digits}g} ± {iv.std:.2g} [{iv.low:.{digits}g}, {iv.high:.{digits}g}]"


def _mean(c: CellResult, name: str, digits: int = 3) -> str:
    iv = c.iv(name)
    return "n/a" if iv.n == 0 else f"{iv.mean:.{digits}g}"


def _extra_columns(sr: StudyResult) -> list[tuple[str, Any]]:
    if sr.name == "presets":
        return [("peak RSS MB", lambda c: _mean(c, "peak_rss_mb", 4))]
    if sr.name == "clipping":
        return [("clipped steps", lambda c: _mean(c, "clip_fraction", 2)),
                ("skipped steps", lambda c: _mean(c, "skipped", 3)),
                ("rollbacks", lambda c: _mean(c, "rollbacks", 2))]
    return []


def study_table(sr: StudyResult) -> str:
    """The study's Markdown table: one row per cell."""
    extra = _extra_columns(sr)
    if sr.target is not None:
        extra.insert(0, (f"epochs to val_loss <= {sr.target:.3g} (reached)", lambda c: (
            "n/a" if not c.runs else f"{_cell(c.epochs_to(sr.target, sr.epochs), 2)} "
            f"({c.reached(sr.target)}/{len(c.runs)})")))
        extra.insert(1, ("training s to it (runs that reached it)", lambda c: (
            "n/a" if not c.reached(sr.target) else _cell(c.seconds_to(sr.target), 2))))
    head = (["cell", "runs", sr.test_name, "best val_loss", "final val_loss",
             "gap (val - train)", "s/epoch"] + [name for name, _ in extra])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in sr.cells:
        row = [c.cell.label, f"{len(c.runs)}/{c.planned}", _cell(c.iv("test_value")),
               _cell(c.iv("best_value")), _cell(c.iv("final_value")), _cell(c.iv("gap"), 2),
               _mean(c, "s_per_epoch", 3)] + [fn(c) for _, fn in extra]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _plot_intervals(sr: StudyResult, path: Path) -> Path:
    """The test metric per cell: each seed a dot, the mean and its 95% interval a bar (one
    colour per cell name before its ``@fraction``)."""
    from matplotlib.figure import Figure

    cells = [c for c in sr.cells if c.runs]
    groups = list(dict.fromkeys(c.cell.label.split(" @")[0] for c in cells))
    fig = Figure(figsize=(7, 0.3 * len(cells) + 1.2), layout="constrained")
    ax = fig.add_subplot()
    for y, c in enumerate(cells):
        color = f"C{groups.index(c.cell.label.split(' @')[0]) % 10}"
        vals, iv = c.values("test_value"), c.iv("test_value")
        ax.plot(vals, [y] * len(vals), "o", ms=3, color="0.6")
        if iv.n >= 2:
            ax.errorbar(iv.mean, y, xerr=[[iv.mean - iv.low], [iv.high - iv.mean]], fmt="s",
                        ms=5, color=color, capsize=3)
        elif iv.n == 1:
            ax.plot(iv.mean, y, "s", ms=5, color=color)
    ax.set_yticks(range(len(cells)), [c.cell.label for c in cells], fontsize=8)
    ax.invert_yaxis()
    better = "higher" if sr.higher_is_better else "lower"
    ax.set_xlabel(f"held-out {sr.test_name} ({better} is better); mean, 95% interval; "
                  "dots: seeds", fontsize=8)
    ax.set_title(sr.title, fontsize=9)
    ax.grid(alpha=0.3, axis="x")
    fig.savefig(path, dpi=80)
    return path


def write_plots(results: dict[str, StudyResult], folder: Path) -> list[Path]:
    """Each study's interval plot; the learning curves of the schedulers (without warmup) and
    of the notes study. Returns the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for sr in results.values():
        if any(c.runs for c in sr.cells):
            out.append(_plot_intervals(sr, folder / f"{sr.name}.png"))
        if sr.name in ("schedulers", "notes"):
            runs = [r for c in sr.cells if "warmup" not in c.cell.label for r in c.runs]
            if runs:
                out.append(plot_curves(runs, folder / f"{sr.name}_curves.png",
                                       title=f"{sr.name}: validation loss, mean over seeds "
                                       "(band: min-max)"))
    return out


def _claims_table(claims: list[Claim]) -> str:
    lines = ["| guide claim | verdict here | the numbers (mean [95% interval]) |",
             "|---|---|---|"]
    lines += [f"| {c.guide} | **{c.verdict}** | {c.evidence} |" for c in claims]
    return "\n".join(lines) + "\n"


def _header(meta: dict[str, Any]) -> list[str]:
    import torch

    s = meta["scale"]
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in
                   Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import os

    again = (f" (tables rewritten {meta['rewritten']} from the same runs)"
             if meta.get("rewritten") else "")
    return [
        "# Evidence: the guide's advice, measured",
        "",
        "<!-- written by `make evidence` (scripts/evidence.py); do not edit: rerun it -->",
        f"Measured {meta['started']} on {cpu}, {os.cpu_count()} cores, torch {torch.__version__}"
        f", CPU; `{meta['command']}` in {meta['wall_seconds'] / 60:.1f} min wall{again} "
        f"({s['jobs']} runs at a time, one torch thread each; 1-minute load average "
        f"{meta['load_before']} before, {meta['load_after']} after). {s['seeds']} seeds per cell "
        f"(0..{s['seeds'] - 1}), {s['epochs']} epochs per emotion run and {s['notes_epochs']} "
        f"per notes run, emotion with per_piece={s['per_piece']} (the harder `emotion` task: "
        "original keys, several timbres, reverb and noise; split by melody).",
        "",
        "Each cell is the `stable` preset with the options the cell names (the stable preset "
        f"is what `make demo` trains), run by `advtrain compare`'s machinery into "
        f"`{meta['scratch']}/` (resumable; equal options share runs). Values: mean ± standard "
        "deviation [95% Student-t interval of the mean] over the seeds; held-out = the test "
        "split of melodies never trained on; the kept epoch is the one of the best val_loss. "
        "Times are training seconds per epoch with two runs sharing the two cores.",
        "",
    ]


def write_markdown(path: Path, results: dict[str, StudyResult], claims: list[Claim],
                   meta: dict[str, Any], plots: list[Path], root: Path) -> Path:
    """Write ``evidence.md`` at ``path``: the header, the claims, each study's supported
    changes, then each study (its table, plots, skipped cells, failures)."""
    lines = _header(meta)
    lines += ["## The guide's claims", "", RULE, "", _claims_table(claims),
              "## What each study supports", "",
              "The best cell of each study against the stable preset's own cell (the rule "
              "above: a change is supported only when the intervals separate):", ""]
    lines += [f"- **{sr.name}**: {best_against_base(sr, BASES.get(sr.name, ''))}"
              for sr in results.values()]
    lines.append("")
    for sr in results.values():
        lines += [f"## {sr.title} ({sr.task})", "", sr.what[0].upper() + sr.what[1:], ""]
        if sr.target is not None:
            lines += [f"Target: val_loss <= {sr.target:.3g}, the value 3 of 4 of the study's "
                      "runs reach (an unreached target counts as the budget + 1 epochs).", ""]
        lines += [study_table(sr)]
        lines += [f"- {n}" for n in sr.notes]
        lines += [f"- skipped: {s}" for s in sr.skipped]
        lines += [f"- failed: {f}" for f in sr.failed]
        for p in plots:
            if p.stem in (sr.name, f"{sr.name}_curves"):
                rel = Path(p).relative_to(path.parent) if path.parent in Path(p).parents else p
                lines += ["", f"![{sr.title}: {p.stem}]({rel.as_posix()})"]
        lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines).rstrip() + "\n")
    return path

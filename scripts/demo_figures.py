"""The README's "What `make demo` does" figures, regenerated from a run (never typed by hand).

``make figures`` runs ``make demo``'s two commands into ``runs/demo`` with an empty data cache
(``advtrain train --task emotion --preset stable --out runs/demo``, then ``advtrain report
runs/demo``), times them, and rewrites the README's block between the ``demo-figures`` markers.
Every number comes from the run's ``summary.json``, ``metrics.jsonl`` and ``diagnosis.txt``
(and, with ``--run``, the wall time of both commands and the load average around them, kept in
``RUN_DIR/demo_timing.json``).

Usage::

    python scripts/demo_figures.py runs/demo                         # print the rows of a run
    python scripts/demo_figures.py --run runs/demo --readme README.md # run the demo, then rewrite
    python scripts/demo_figures.py --lr-find docs/lr-find.png        # the README's LR finder

``--lr-find PNG`` runs ``advtrain lr-find --task emotion --preset stable --out runs/lr_find``
(the defaults: 3 sweeps of 100 steps from 1e-7 to 10), copies its ``lr_find.png`` to PNG and
prints the suggestion and its spread from ``lr_find.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo: benchmarks/
from benchmarks.machine import cpu_model  # noqa: E402

START = "<!-- demo-figures: written by `make figures` (scripts/demo_figures.py); do not edit -->"
END = "<!-- /demo-figures -->"
TIMING = "demo_timing.json"
LR_FIND_DIR = Path("runs/lr_find")


def demo_commands(run_dir: Path) -> list[list[str]]:
    """``make demo``'s two commands, through this interpreter."""
    cli = [sys.executable, "-m", "advanced_training_utils"]
    return [[*cli, "train", "--task", "emotion", "--preset", "stable", "--out", str(run_dir)],
            [*cli, "report", str(run_dir)]]


def run_demo(run_dir: Path) -> dict[str, Any]:
    """Run both commands with an empty data cache (a fresh ``ADVTRAIN_CACHE``); write and return
    ``RUN_DIR/demo_timing.json``: wall seconds of both, load averages before and after."""
    before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="advtrain-demo-cache-") as cache:
        env = dict(os.environ, ADVTRAIN_CACHE=cache)
        t0 = time.perf_counter()
        for cmd in demo_commands(run_dir):
            subprocess.run(cmd, env=env, check=True)
        wall = time.perf_counter() - t0
    timing = {"wall_seconds": round(wall, 1), "date": time.strftime("%Y-%m-%d"),
              "load_before": [round(x, 2) for x in before],
              "load_after": [round(x, 2) for x in os.getloadavg()],
              "cpus": os.cpu_count(), "cpu": cpu_model(), "empty_data_cache": True,
              "summary_wall_seconds": json.loads((run_dir / "summary.json").read_text())[
                  "wall_seconds"]}
    (run_dir / TIMING).write_text(json.dumps(timing, indent=2) + "\n")
    return timing


def _history(run_dir: Path) -> list[dict[str, Any]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def figures(run_dir: Path) -> dict[str, Any]:
    """The numbers of the README block, from the files of ``run_dir``."""
    s = json.loads((run_dir / "summary.json").read_text())
    if s.get("task") != "emotion":
        raise SystemExit(f"{run_dir}: not an emotion run (task {s.get('task')!r})")
    hist = {h["epoch"]: h for h in _history(run_dir)}
    best = hist[s["best_epoch"]]
    top = max(hist.values(), key=lambda h: (h.get("val_accuracy") or 0.0, -h["epoch"]))
    timing = (json.loads((run_dir / TIMING).read_text()) if (run_dir / TIMING).is_file()
              else None)
    if timing is not None and timing.get("summary_wall_seconds") != s["wall_seconds"]:
        timing = None              # written for an earlier run in this folder
    d = s["data"]
    return {
        "test_accuracy": s["test_accuracy"], "test_examples": s["test_examples"],
        "majority": s["majority_baseline_accuracy"],
        "clips": d["train_examples"] + d["val_examples"] + d["test_examples"],
        "best_epoch": s["best_epoch"], "epochs_run": s["epochs_run"],
        "best_val_loss": s["best_val_loss"], "best_epoch_val_accuracy": best.get("val_accuracy"),
        "top_val_accuracy": top.get("val_accuracy"), "top_val_accuracy_epoch": top["epoch"],
        "last_val_loss": hist[s["epochs_run"]]["val_loss"],
        "restored_best": s["options"].get("restore_best_weights", False),
        "data_seconds": s["data_seconds"], "train_wall_seconds": s["wall_seconds"],
        "torch": s["torch"], "seed": s["seed"], "device": s["device"],
        "diagnosis": (run_dir / "diagnosis.txt").read_text().strip()
        if (run_dir / "diagnosis.txt").is_file() else "",
        "timing": timing,
    }


def _context(f: dict[str, Any]) -> str:
    t = f["timing"]
    if t is None:
        return (f"Figures of an existing run (torch {f['torch']}, seed {f['seed']}, "
                f"{f['device']}); its data cache may have been warm.")
    lb, la = t["load_before"][0], t["load_after"][0]
    busy = ("; other jobs were running, so the times are longer than on an idle machine"
            if lb > 1.0 else "")          # after the run, its own threads are in the average
    return (f"Measured on {t['cpu']}, {t['cpus']} cores (torch {f['torch']}, seed {f['seed']}, "
            f"{f['device']}, `make figures`: `make demo`'s two commands with an empty data "
            f"cache, {t['date']}; 1-minute load average {lb:.2f} before the run, {la:.2f} after "
            f"it, the run's own threads included{busy}):")


def rows(f: dict[str, Any]) -> list[str]:
    """The README table (markdown lines)."""
    t = f["timing"]
    wall = (f"| whole `make demo` (both commands: rendering, {f['epochs_run']} epochs, test and "
            f"report) | {t['wall_seconds']:.1f} s wall |" if t is not None else
            f"| `advtrain train` (rendering, {f['epochs_run']} epochs and test; `wall_seconds`) | "
            f"{f['train_wall_seconds']:.1f} s wall |")
    kept = (f"best validation loss {f['best_val_loss']:.4f} at epoch {f['best_epoch']} of "
            f"{f['epochs_run']}, validation accuracy {f['best_epoch_val_accuracy']:.3f} there")
    return [
        "| figure | value |", "| --- | --- |",
        f"| held-out test accuracy ({f['test_examples']} clips of melodies never seen in "
        f"training) | **{f['test_accuracy']:.3f}** (majority class: {f['majority']:.3f}) |",
        f"| best validation accuracy | {f['top_val_accuracy']:.3f} (epoch "
        f"{f['top_val_accuracy_epoch']}) |",
        f"| the epoch whose weights are kept | {kept} |",
        f"| data rendering ({f['clips']:,} clips) | {f['data_seconds']:.1f} s |",
        wall,
    ]


def block(f: dict[str, Any]) -> str:
    """The README block: context line, table, the diagnosis; between the markers."""
    kept = (f"the best weights (epoch {f['best_epoch']}) are the ones kept"
            if f["restored_best"] else "the last epoch's weights are kept")
    lines = [START, _context(f), "", *rows(f), "",
             f"Validation loss {f['best_val_loss']:.4f} at epoch {f['best_epoch']}, "
             f"{f['last_val_loss']:.4f} at epoch {f['epochs_run']}; {kept}. The report's "
             "diagnosis of this run (`diagnosis.txt`):", "", "```", f["diagnosis"] or "(none)",
             "```", END]
    return "\n".join(lines)


def rewrite_readme(readme: Path, text: str) -> None:
    """Replace the block between the markers of ``readme`` with ``text``."""
    old = readme.read_text()
    i, j = old.find(START), old.find(END)
    if i < 0 or j < i:
        raise SystemExit(f"{readme}: no {START!r} ... {END!r} block to rewrite")
    readme.write_text(old[:i] + text + old[j + len(END):])


def lr_find_figure(png: Path, out: Path = LR_FIND_DIR) -> dict[str, Any]:
    """Run ``advtrain lr-find`` on the built-in task into ``out``, copy its plot to ``png``;
    return the figures of ``lr_find.json`` (suggestion, spread, each sweep's, wall time)."""
    cmd = [sys.executable, "-m", "advanced_training_utils", "lr-find", "--task", "emotion",
           "--preset", "stable", "--out", str(out)]
    subprocess.run(cmd, check=True)
    png.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(out / "lr_find.png", png)
    d = json.loads((out / "lr_find.json").read_text())
    keys = ("suggestion", "spread", "spread_ratio", "suggestions", "stopped", "seconds", "settings")
    return {"command": " ".join(cmd[1:]), "png": str(png), **{k: d[k] for k in keys}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path, nargs="?", default=Path("runs/demo"))
    ap.add_argument("--run", action="store_true",
                    help="first run make demo's two commands into RUN_DIR (empty data cache)")
    ap.add_argument("--readme", type=Path, help="rewrite this README's demo-figures block")
    ap.add_argument("--lr-find", type=Path, metavar="PNG",
                    help="only run advtrain lr-find on the built-in task; copy its plot to PNG")
    args = ap.parse_args(argv)
    if args.lr_find is not None:
        print(json.dumps(lr_find_figure(args.lr_find), indent=2))
        return 0
    if args.run:
        run_demo(args.run_dir)
    text = block(figures(args.run_dir))
    print(text)
    if args.readme is not None:
        rewrite_readme(args.readme, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

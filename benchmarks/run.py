"""``make bench``: every benchmark as a ratio to its baseline, measured in the same run.

Each measurement is a fresh process (``python -m benchmarks.cases CASE VARIANT``) with one torch
thread; variants of a comparison run interleaved (baseline, ours, baseline, ours, ...) for
``--reps`` repetitions; the table gives the median ratio and its min-max over the repetitions.
The glibc allocator is pinned (``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` at
1 GiB) unless ``--no-pin``; the ``allocator`` row measures what pinning changes on the hand loop.
Writes ``benchmarks/results/cpu.json`` and ``cpu.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
PIN = {"MALLOC_MMAP_THRESHOLD_": "1073741824", "MALLOC_TRIM_THRESHOLD_": "1073741824"}

# (row name, case, baseline variant, our variant, what the target says)
COMPARISONS = [
    ("loop overhead, tiny MLP", "loop_mlp", "hand", "ours", "<= +50 us/step"),
    ("loop overhead, small CNN", "loop_cnn", "hand", "ours", "<= +1%"),
    ("augment_audio_features vs clone", "augment", "clone", "ours", "<= 3x"),
    ("per-example loop vs augment_audio_features", "augment", "ours", "loop", ">= 10x"),
    ("check_gradients vs get_total_norm", "stability", "total_norm", "check_gradients", "<= 1.5x"),
    ("check_weights vs get_total_norm", "stability", "total_norm", "check_weights", "<= 1.5x"),
    ("save_checkpoint vs torch.save", "checkpoint", "torch_save", "ours_save", "<= 1.2x"),
    ("load_checkpoint vs torch.load", "checkpoint", "torch_load", "ours_load", "<= 1.2x"),
    ("resume latency at 90% vs 10% of an epoch", "resume", "at10", "at90", "flat (~1x)"),
    ("epoch time per sample, 4x data vs 1x", "scaling", "1x", "4x", "1x +-10%"),
    ("epoch time per sample, 16x data vs 1x", "scaling", "1x", "16x", "1x +-10%"),
]


def _measure(case: str, variant: str, pin: bool) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + str(ROOT))
    for k in PIN:
        env.pop(k, None)
    if pin:
        env.update(PIN)
    out = subprocess.run([sys.executable, "-m", "benchmarks.cases", case, variant], env=env,
                         capture_output=True, text=True, cwd=ROOT, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"{case} {variant} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _ratio(case: str, base: dict[str, Any], ours: dict[str, Any]) -> float:
    if case == "scaling":  # per-sample time
        return (ours["seconds"] / ours["samples"]) / (base["seconds"] / base["samples"])
    return ours["seconds"] / base["seconds"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--only", nargs="*", help="case names to run")
    ap.add_argument("--no-pin", action="store_true")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    needed: dict[str, list[str]] = {}
    for _, case, base, ours, _t in COMPARISONS:
        if args.only and case not in args.only:
            continue
        for v in (base, ours):
            if v not in needed.setdefault(case, []):
                needed[case].append(v)
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for rep in range(args.reps):
        for case, variants in needed.items():
            for v in variants:  # interleaved: every variant once per repetition
                runs.setdefault((case, v), []).append(_measure(case, v, not args.no_pin))
        print(f"repetition {rep + 1}/{args.reps} done ({time.perf_counter() - t_start:.0f}s)",
              flush=True)
    alloc = None
    if not args.only or "allocator" in args.only:
        pinned, unpinned = [], []
        for _ in range(args.reps):
            pinned.append(_measure("loop_mlp", "hand", True)["seconds"])
            unpinned.append(_measure("loop_mlp", "hand", False)["seconds"])
        alloc = {"pinned_s": pinned, "default_s": unpinned,
                 "default_over_pinned": [u / p for u, p in zip(unpinned, pinned)]}
    rows = []
    for name, case, base, ours, target in COMPARISONS:
        if case not in needed:
            continue
        b, o = runs[(case, base)], runs[(case, ours)]
        ratios = [_ratio(case, x, y) for x, y in zip(b, o)]
        row = {"name": name, "case": case, "baseline": base, "variant": ours, "target": target,
               "ratio_median": statistics.median(ratios), "ratio_min": min(ratios),
               "ratio_max": max(ratios),
               "baseline_s_median": statistics.median(x["seconds"] for x in b),
               "variant_s_median": statistics.median(x["seconds"] for x in o)}
        if case.startswith("loop"):
            per_step = [(y["seconds"] - x["seconds"]) / x["steps"] * 1e6 for x, y in zip(b, o)]
            row.update(us_per_step_median=statistics.median(per_step),
                       us_per_step_min=min(per_step), us_per_step_max=max(per_step))
        rows.append(row)
    env = {"python": platform.python_version(), "torch": torch.__version__,
           "machine": platform.machine(), "cpus": os.cpu_count(), "reps": args.reps,
           "allocator_pinned": not args.no_pin, "seconds": time.perf_counter() - t_start}
    out_dir = ROOT / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.only and (out_dir / "cpu.json").exists():
        # A partial run replaces its own rows in the last full results.
        old = json.loads((out_dir / "cpu.json").read_text())
        fresh = {r["name"] for r in rows}
        rows = [r for r in old["rows"] if r["name"] not in fresh] + rows
        order = [c[0] for c in COMPARISONS]
        rows.sort(key=lambda r: order.index(r["name"]))
        alloc = alloc or old.get("allocator")
        env["partial_rerun"] = sorted(needed)
    (out_dir / "cpu.json").write_text(json.dumps({"env": env, "rows": rows, "allocator": alloc},
                                                 indent=2))
    lines = [f"CPU benchmarks: torch {env['torch']}, Python {env['python']}, {env['cpus']} cores, "
             f"1 torch thread, {args.reps} interleaved fresh-process repetitions, allocator "
             f"{'pinned' if env['allocator_pinned'] else 'default'}; "
             f"{env['seconds']:.0f} s in all.", "",
             "| comparison | target | median ratio (min-max) | baseline median | ours median |",
             "| --- | --- | --- | --- | --- |"]
    for r in rows:
        extra = ""
        if "us_per_step_median" in r:
            extra = (f"; {r['us_per_step_median']:+.1f} us/step ({r['us_per_step_min']:+.1f} to "
                     f"{r['us_per_step_max']:+.1f})")
        lines.append(f"| {r['name']} | {r['target']} | {r['ratio_median']:.3f}x "
                     f"({r['ratio_min']:.3f}-{r['ratio_max']:.3f}){extra} | "
                     f"{r['baseline_s_median'] * 1e3:.2f} ms | {r['variant_s_median'] * 1e3:.2f} ms |")
    if alloc:
        d = alloc["default_over_pinned"]
        lines += ["", f"Allocator: the hand-written MLP loop with glibc's default thresholds takes "
                  f"{statistics.median(d):.3f}x (min {min(d):.3f}, max {max(d):.3f}) the time "
                  "it takes with them pinned at 1 GiB; run-to-run spread (max/min) default "
                  f"{max(alloc['default_s']) / min(alloc['default_s']):.3f}, pinned "
                  f"{max(alloc['pinned_s']) / min(alloc['pinned_s']):.3f}."]
    text = "\n".join(lines) + "\n"
    (out_dir / "cpu.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

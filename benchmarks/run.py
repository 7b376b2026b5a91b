"""``make bench``: every benchmark as a ratio to its baseline, measured in the same run.

Each measurement is a fresh process (``python -m benchmarks.cases CASE VARIANT``) with one torch
thread; variants of a comparison run interleaved (baseline, ours, baseline, ours, ...) for
``--reps`` repetitions; the table gives the median ratio and its min-max over the repetitions.
The glibc allocator is pinned (``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` at
1 GiB) unless ``--no-pin``; the ``allocator`` row measures what pinning changes on the hand loop.
Writes ``benchmarks/results/cpu.json`` and ``cpu.md`` (``--out-dir`` elsewhere); the own-audio
rows (``AUDIO_COMPARISONS``) form a section of their own, with the command, date, machine and
load average; a run that measures only one part keeps the other part's text.
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

from benchmarks.machine import cpu_model

ROOT = Path(__file__).resolve().parents[1]
PIN = {"MALLOC_MMAP_THRESHOLD_": "1073741824", "MALLOC_TRIM_THRESHOLD_": "1073741824"}

# (row name, case, baseline variant, our variant, what the target says)
COMPARISONS = [
    ("loop overhead, tiny MLP", "loop_mlp", "hand", "ours", "<= +50 us/step"),
    ("loop overhead, small CNN", "loop_cnn", "hand", "ours", "<= +1%"),
    ("EMA on (ema_decay=0.999) vs off, tiny MLP", "loop_mlp", "ours", "ema",
     "added us/step stated"),
    ("EMA on (ema_decay=0.999) vs off, small CNN", "loop_cnn", "ours", "ema",
     "added us/step stated"),
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

# The own-audio issue's rows: a section of their own in cpu.md ("audio" in cpu.json). Each name
# reads "A vs B": the ratio is A's time over B's (B is the baseline variant).
AUDIO_COMPARISONS = [
    ("feature extraction (decode, soxr to 16 kHz, log-mel) of 64 wavs, cold cache vs cache hit",
     "audio_features", "cached", "cold", "speed-up, no target"),
    ("epoch of train_model_advanced, --data task from a warm feature cache vs the built-in "
     "emotion task's tensors (256 training clips, [1, 64, 251])",
     "audio_epoch", "builtin", "data", "~1x"),
]
AUDIO_HEADING = "## User audio (the own-audio issue)"
AUDIO_NOTES = (
    "What is measured (`benchmarks/cases.py`): **feature extraction**: 64 wavs written with "
    "soundfile (2-4 s, 22.05 and 44.1 kHz, mono and stereo, PCM-16, in the OS page cache) "
    "through `FeatureExtractor` (soundfile decode, mix to mono, soxr HQ to 16 kHz, speech "
    "`LogMel`); cold: an empty cache directory, so the time includes writing the 64 entries; "
    "cache hit: every entry on disk (file stat, SHA-256 key, `np.load`); each the median of 5 "
    "passes in the process; clips/s = 64 / time. **Epoch**: `train_model_advanced` with the "
    "`stable` preset (augmentation, clipping, plateau, stability checks; lr 3e-3, accuracy), "
    "`EmotionRecognizer`, batch 32, on the same 256 training and 48 validation clips of the "
    "built-in emotion task: B is the built-in task's pipeline (log-mels in a `TensorDataset`), A "
    "is the `--data` task's (the clips written as 16 kHz wavs with a `labels.csv`, "
    "`build_audio_task` with `features=chorale, crop_seconds=4` from a warm cache: per-item "
    "crops, `EpochSampler`, padding collate; validation batch 64 instead of 256); the time is "
    "the median of epochs 2-4 (`history[i][\"seconds\"]`); clips/s = training clips / epoch "
    "time.")


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


def _needed(comparisons: list[tuple[str, ...]], only: list[str] | None) -> dict[str, list[str]]:
    """Case -> its variants to measure (in order), for the comparisons ``only`` selects."""
    known = {c[1] for c in comparisons} | {"allocator"}
    unknown = sorted(set(only or ()) - known)
    if unknown:
        raise SystemExit(f"--only: unknown case(s) {unknown}; known: {sorted(known)}")
    needed: dict[str, list[str]] = {}
    for _, case, base, ours, _t in comparisons:
        if only and case not in only:
            continue
        for v in (base, ours):
            if v not in needed.setdefault(case, []):
                needed[case].append(v)
    return needed


def _measure_all(needed: dict[str, list[str]], reps: int, pin: bool, t_start: float
                 ) -> dict[tuple[str, str], list[dict[str, Any]]]:
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for rep in range(reps):
        for case, variants in needed.items():
            for v in variants:  # interleaved: every variant once per repetition
                runs.setdefault((case, v), []).append(_measure(case, v, pin))
        print(f"repetition {rep + 1}/{reps} done ({time.perf_counter() - t_start:.0f}s)",
              flush=True)
    return runs


def _info(measurements: list[dict[str, Any]]) -> dict[str, Any]:
    """What a case reports besides its seconds: medians of numbers, else the first value."""
    out: dict[str, Any] = {}
    for k, v in measurements[0].items():
        if k in ("case", "variant", "seconds"):
            continue
        nums = [m[k] for m in measurements]
        out[k] = statistics.median(nums) if isinstance(v, (int, float)) else v
    return out


def _rows(comparisons: list[tuple[str, ...]], needed: dict[str, list[str]],
          runs: dict[tuple[str, str], list[dict[str, Any]]]) -> list[dict[str, Any]]:
    rows = []
    for name, case, base, ours, target in comparisons:
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
        if case.startswith("audio"):
            row.update(baseline_info=_info(b), variant_info=_info(o))
        rows.append(row)
    return rows


def _allocator(reps: int) -> dict[str, Any]:
    pinned, unpinned = [], []
    for _ in range(reps):
        pinned.append(_measure("loop_mlp", "hand", True)["seconds"])
        unpinned.append(_measure("loop_mlp", "hand", False)["seconds"])
    return {"pinned_s": pinned, "default_s": unpinned,
            "default_over_pinned": [u / p for u, p in zip(unpinned, pinned)]}


def _main_text(env: dict[str, Any], rows: list[dict[str, Any]], alloc: dict[str, Any] | None
               ) -> str:
    """The main table of cpu.md (the comparisons of ``COMPARISONS``)."""
    lines = [f"CPU benchmarks: torch {env['torch']}, Python {env['python']}, {env['cpus']} cores, "
             f"1 torch thread, {env['reps']} interleaved fresh-process repetitions, allocator "
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
    return "\n".join(lines) + "\n"


def _timed(seconds: float, clips: float | None) -> str:
    rate = f" ({clips / seconds:,.0f} clips/s)" if clips else ""
    return f"{seconds * 1e3:.1f} ms{rate}"


def _audio_text(audio: dict[str, Any]) -> str:
    """The "User audio" section of cpu.md: command, date, machine, load, the table."""
    env = audio["env"]
    before, after = env["load_before"], env["load_after"]
    busy = max(before[0], after[0] - 1.0) > 0.5     # a run alone adds about 1
    load = (f"Load average (1/5/15 min) {before[0]:.2f}/{before[1]:.2f}/{before[2]:.2f} before, "
            f"{after[0]:.2f}/{after[1]:.2f}/{after[2]:.2f} after the run (the run itself adds "
            f"about 1): {'other jobs were running on this machine' if busy else 'quiet'}.")
    lines = [AUDIO_HEADING, "",
             f"`{env['command']}` on {env['date']}: {env['cpu']}, {env['cpus']} cores, torch "
             f"{env['torch']}, Python {env['python']}, 1 torch thread, {env['reps']} interleaved "
             f"fresh-process repetitions, allocator {'pinned' if env['allocator_pinned'] else 'default'}; "
             f"{env['seconds']:.0f} s in all. {load}"
             + (f" Rows of other cases are kept from `{env['kept_rows_from']}`."
                if env.get("kept_rows_from") else ""), "",
             "| comparison (A vs B) | target | A / B, median (min-max) | B median | A median |",
             "| --- | --- | --- | --- | --- |"]
    for r in audio["rows"]:
        b, o = r["baseline_info"], r["variant_info"]
        lines.append(f"| {r['name']} | {r['target']} | {r['ratio_median']:.2f}x "
                     f"({r['ratio_min']:.2f}-{r['ratio_max']:.2f}) | "
                     f"{_timed(r['baseline_s_median'], b.get('clips'))} | "
                     f"{_timed(r['variant_s_median'], o.get('clips'))} |")
    lines += ["", AUDIO_NOTES]
    return "\n".join(lines) + "\n"


def _write_md(path: Path, main_text: str | None, audio_text: str | None) -> str:
    """cpu.md = the main table, then the "User audio" section; a part not re-run is kept."""
    old = path.read_text() if path.exists() else ""
    old_main, sep, old_audio = old.partition(AUDIO_HEADING)
    main_part = main_text if main_text is not None else old_main.rstrip("\n") + "\n"
    audio_part = audio_text if audio_text is not None else (sep + old_audio if sep else "")
    text = main_part + ("\n" + audio_part if audio_part else "")
    path.write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--only", nargs="*", help="case names to run")
    ap.add_argument("--no-pin", action="store_true")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results",
                    help="where cpu.json and cpu.md are written")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    load_before = os.getloadavg()
    needed = _needed(COMPARISONS + AUDIO_COMPARISONS, args.only)
    runs = _measure_all(needed, args.reps, not args.no_pin, t_start)
    alloc = _allocator(args.reps) if not args.only or "allocator" in args.only else None
    rows = _rows(COMPARISONS, needed, runs)
    audio_rows = _rows(AUDIO_COMPARISONS, needed, runs)
    env = {"python": platform.python_version(), "torch": torch.__version__,
           "machine": platform.machine(), "cpus": os.cpu_count(), "reps": args.reps,
           "allocator_pinned": not args.no_pin, "seconds": time.perf_counter() - t_start}
    out_dir = args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    old = json.loads((out_dir / "cpu.json").read_text()) if (out_dir / "cpu.json").exists() else {}
    result = dict(old)
    main_text = audio_text = None
    if rows or alloc:
        if args.only and old.get("rows"):
            # A partial run replaces its own rows in the last full results.
            fresh = {r["name"] for r in rows}
            rows = [r for r in old["rows"] if r["name"] not in fresh] + rows
            order = [c[0] for c in COMPARISONS]
            rows.sort(key=lambda r: order.index(r["name"]))
            alloc = alloc or old.get("allocator")
            env["partial_rerun"] = sorted(c for c in needed if not c.startswith("audio"))
        result.update(env=env, rows=rows, allocator=alloc)
        main_text = _main_text(env, rows, alloc)
    if audio_rows:
        argv_text = " ".join(sys.argv[1:] if argv is None else argv)
        audio_env = {**env, "cpu": cpu_model(), "date": time.strftime("%Y-%m-%d"),
                     "command": f"python -m benchmarks.run {argv_text}".strip(),
                     "load_before": list(load_before), "load_after": list(os.getloadavg())}
        prev = old.get("audio") or {"rows": []}
        fresh = {r["name"] for r in audio_rows}
        kept = [r for r in prev["rows"] if r["name"] not in fresh]
        if kept:   # a run of one audio case keeps the other's row, and says from when
            audio_env["kept_rows_from"] = f"{prev['env']['command']} ({prev['env']['date']})"
            order = [c[0] for c in AUDIO_COMPARISONS]
            audio_rows = sorted(kept + audio_rows, key=lambda r: order.index(r["name"]))
        result["audio"] = {"env": audio_env, "rows": audio_rows}
        audio_text = _audio_text(result["audio"])
    (out_dir / "cpu.json").write_text(json.dumps(result, indent=2))
    print(_write_md(out_dir / "cpu.md", main_text, audio_text))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

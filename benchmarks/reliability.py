"""Reliability figures for the README (the larger counts of the crash-safety tests).

    PYTHONPATH=src python benchmarks/reliability.py [--kills 20] [--nan-runs 20]

1. kill -9 at random points of ``tests/crash_worker.py`` (per-step checkpoints), then resume,
   ``--kills`` times; the final weights must be bit-identical to an uninterrupted run's.
2. NaN/Inf injected into inputs and gradients at random steps, ``--nan-runs`` runs: each must
   finish with a final val loss within 5% of the clean run's; with recovery off, each must end
   non-finite (showing the check can fail).
Prints a markdown table; writes ``benchmarks/results/reliability.md``.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
WORKER = ROOT / "tests" / "crash_worker.py"


def _spawn(out: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    return subprocess.Popen([sys.executable, str(WORKER), str(out), "--epochs", "12"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)


def kill_test(kills: int, seed: int = 7) -> dict:
    rng = random.Random(seed)
    with TemporaryDirectory() as ref_dir, TemporaryDirectory() as run_dir:
        p = _spawn(Path(ref_dir))
        assert p.wait() == 0
        ref = torch.load(Path(ref_dir) / "final.pt", weights_only=True)
        done = 0
        while done < kills:
            p = _spawn(Path(run_dir))
            target = rng.randint(1, 40)
            lines = 0
            while lines < target and p.stdout.readline():
                lines += 1
            if lines < target:  # finished before the kill point: start over counting
                p.wait()
                break
            p.send_signal(signal.SIGKILL)
            p.wait()
            done += 1
        p = _spawn(Path(run_dir))
        assert p.wait() == 0
        got = torch.load(Path(run_dir) / "final.pt", weights_only=True)
        exact = all(torch.equal(got[k], ref[k]) for k in ref)
    return {"kills": done, "bit_identical": exact}


def nan_test(runs: int) -> dict:
    import test_recovery as tr  # the CI test's own injection run, at a larger count
    from _helpers import make_model
    from advanced_training_utils import train_model_advanced

    tl, vl = tr._loaders()
    model = make_model(1, features=tr.F)
    clean_loss = train_model_advanced(model, tl, vl, tr.CE, epochs=6, learning_rate=3e-3,
                                      device="cpu", verbose=False, seed=0, use_scheduler=False,
                                      restore_best_weights=False)["history"][-1]["val_loss"]
    within, nonfinite_off, worst = 0, 0, 0.0
    values = [math.nan, math.inf, -math.inf]
    for i in range(runs):
        v = values[i % 3]
        res, _ = tr._run(100 + i, True, v)
        rel = abs(res["history"][-1]["val_loss"] - clean_loss) / clean_loss
        worst = max(worst, rel)
        within += rel < 0.05
        res_off, _ = tr._run(100 + i, False, v)
        nonfinite_off += not math.isfinite(res_off["history"][-1]["val_loss"])
    return {"runs": runs, "within_5pct": within, "worst_rel_diff": worst,
            "nonfinite_without_recovery": nonfinite_off}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--nan-runs", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    k = kill_test(args.kills)
    n = nan_test(args.nan_runs)
    lines = [
        "| check | result |", "| --- | --- |",
        f"| kill -9 at random points, then resume ({k['kills']} kills) | final weights "
        f"bit-identical: {k['bit_identical']} |",
        f"| NaN/Inf injected into inputs and gradients ({n['runs']} runs) | {n['within_5pct']}"
        f"/{n['runs']} within 5% of the clean val loss (worst {n['worst_rel_diff']:.2%}) |",
        f"| same runs with recovery=False | {n['nonfinite_without_recovery']}/{n['runs']} "
        "end non-finite |",
        "", f"({time.perf_counter() - t0:.0f} s, torch {torch.__version__})",
    ]
    text = "\n".join(lines)
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "reliability.md").write_text(text + "\n")
    print(text)
    return 0 if (k["bit_identical"] and n["within_5pct"] == n["runs"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())

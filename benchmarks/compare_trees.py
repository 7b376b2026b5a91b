"""Old code against new code on one benchmark case, interleaved: is the loop any slower?

    git archive <commit> src benchmarks | tar -x -C /tmp/oldrepo
    python benchmarks/compare_trees.py loop_mlp 16 --old /tmp/oldrepo --new .

Runs ``python -m benchmarks.cases CASE ours`` in each tree as a fresh process (one torch thread,
the glibc allocator pinned), alternating which tree goes first, REPS times each, and prints the
median of the per-pair ratios new / old with its min and max, and the median difference per step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

PIN = {"MALLOC_MMAP_THRESHOLD_": "1073741824", "MALLOC_TRIM_THRESHOLD_": "1073741824",
       "OMP_NUM_THREADS": "1"}


def run(case: str, root: str) -> dict:
    env = dict(os.environ, **PIN, PYTHONPATH=f"{root}/src{os.pathsep}{root}")
    out = subprocess.run([sys.executable, "-m", "benchmarks.cases", case, "ours"], env=env,
                         cwd=root, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("case")
    ap.add_argument("reps", type=int)
    ap.add_argument("--old", required=True)
    ap.add_argument("--new", default=".")
    a = ap.parse_args()
    old, new = [], []
    for rep in range(a.reps):
        order = [(old, a.old), (new, a.new)]
        for sink, root in (order if rep % 2 == 0 else order[::-1]):
            sink.append(run(a.case, os.path.abspath(root)))
    o, n = [r["seconds"] for r in old], [r["seconds"] for r in new]
    ratios = [b / x for x, b in zip(o, n)]
    steps = old[0].get("steps", 1)
    print(f"{a.case}: new/old median {statistics.median(ratios):.3f} (min {min(ratios):.3f}, "
          f"max {max(ratios):.3f}) over {a.reps} pairs; "
          f"{(statistics.median(n) - statistics.median(o)) / steps * 1e6:+.1f} us/step")


if __name__ == "__main__":
    main()

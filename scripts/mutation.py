"""Mutation check: inject plausible bugs one at a time and see whether the test suite notices.

``make mutation`` (outside CI; a few minutes on 2 cores). Each mutant in ``scripts/mutants.py``
replaces one exact snippet of a source file with a plausible wrong one (an off-by-one, a dropped
weight, a flag discarded, a file written without its guard). For each mutant this script copies
``src/`` and ``tests/`` into a temporary folder (so subprocess tests, which put their own
repository's ``src`` on the path, see the mutant too), applies the change, and runs the test
files named for it with ``-x``; the mutant is *killed* when a test fails and *survives* when all pass. A mutant whose
snippet no longer occurs in the source is reported as *stale* (the table must follow the code).

The score is killed / (mutants - equivalent); equivalent mutants (changes that cannot alter
behaviour) carry the reason in the table and are listed, not scored.

Usage::

    python scripts/mutation.py                 # all mutants, writes benchmarks/results/mutation.md
    python scripts/mutation.py --only M03 M07  # a few
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from mutants import MUTANTS, Mutant  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "mutation.md"


def _source(src: Path, name: str) -> Path | None:
    """The module ``name`` (a file name such as ``loop.py``, unique in the package, or a path
    below ``src/advanced_training_utils``), wherever the package layout puts it."""
    pkg = src / "advanced_training_utils"
    if (pkg / name).is_file():
        return pkg / name
    found = [p for p in pkg.rglob(Path(name).name) if "__pycache__" not in p.parts]
    return found[0] if len(found) == 1 else None


def _apply(src_copy: Path, m: Mutant) -> bool:
    """Apply ``m`` to the copy; False when the original snippet is not found exactly once."""
    path = _source(src_copy, m.file)
    if path is None:
        return False
    text = path.read_text()
    if text.count(m.original) != 1:
        return False
    path.write_text(text.replace(m.original, m.mutated))
    return True


def run_one(m: Mutant, timeout: float) -> tuple[str, float]:
    """('killed' | 'survived' | 'stale' | 'timeout', seconds)."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mutant-") as tmp:
        repo = Path(tmp)
        for part in ("src", "tests"):
            shutil.copytree(ROOT / part, repo / part,
                            ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy(ROOT / "pyproject.toml", repo / "pyproject.toml")
        if not _apply(repo / "src", m):
            return "stale", 0.0
        env = dict(os.environ)
        env["PYTHONPATH"] = str(repo / "src")
        env.setdefault("ADVTRAIN_GUIDE", str(ROOT.parent / "shared" / "spec"
                                             / "advanced-training-guide.md"))
        env.setdefault("OMP_NUM_THREADS", "1")
        cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
               *[str(repo / "tests" / t) for t in m.tests]]
        try:
            r = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return "timeout", time.perf_counter() - started
    verdict = "survived" if r.returncode == 0 else "killed"
    return verdict, time.perf_counter() - started


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", help="mutant ids to run")
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--no-write", action="store_true", help="do not write the results file")
    args = ap.parse_args()
    chosen = [m for m in MUTANTS if not args.only or m.id in args.only]
    rows = []
    for m in chosen:
        if m.equivalent:
            rows.append((m, "equivalent", 0.0))
            print(f"{m.id} equivalent: {m.equivalent}", flush=True)
            continue
        verdict, secs = run_one(m, args.timeout)
        rows.append((m, verdict, secs))
        print(f"{m.id} {verdict:9s} {secs:6.1f}s  {m.file}: {m.what}", flush=True)
    scored = [r for r in rows if r[1] != "equivalent"]
    killed = sum(r[1] in ("killed", "timeout") for r in scored)
    stale = [r[0].id for r in rows if r[1] == "stale"]
    score = killed / len(scored) if scored else 0.0
    print(f"mutation score: {killed}/{len(scored)} = {score:.1%}"
          + (f"; stale: {stale}" if stale else ""))
    if not args.no_write and not args.only:
        _write(rows, killed, len(scored))
    return 0 if not stale else 1


def _write(rows: list[tuple[Mutant, str, float]], killed: int, scored: int) -> None:
    lines = ["# Mutation check", "",
             "`make mutation` (scripts/mutation.py, mutants in scripts/mutants.py). "
             f"Score: **{killed}/{scored} = {killed / scored:.1%}** killed "
             "(equivalent mutants listed, not scored).", "",
             "| id | file | the injected bug | verdict | tests run |", "|---|---|---|---|---|"]
    for m, verdict, _ in rows:
        what = m.what + (f" (equivalent: {m.equivalent})" if m.equivalent else "")
        lines.append(f"| {m.id} | `{m.file}` | {what} | {verdict} | "
                     + ", ".join(f"`{t}`" for t in m.tests) + " |")
    RESULTS.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())

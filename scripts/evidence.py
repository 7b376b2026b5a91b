"""``make evidence``: the guide's advice measured on the built-in tasks, >= 3 seeds per cell.

Runs the studies of ``scripts/evidence_studies.py`` (schedulers, presets, augmentation at
10/30/100% of the data, clipping, EMA on the harder ``emotion`` task; schedulers and
augmentation on ``notes``) through ``advtrain compare``'s machinery
(:func:`advanced_training_utils.app.compare.compare`, 2 parallel processes), then writes
``benchmarks/results/evidence.md`` (a table per study: mean ± std and the 95% Student-t interval
of the mean over the seeds; each guide claim judged by the rule of
``scripts/evidence_claims.py``; the best cell of each study against the stable preset) and
plots under ``benchmarks/results/evidence/``. The runs are ordinary resumable run folders under
``runs/evidence/`` (not committed): an interrupted ``make evidence`` continues where it stopped,
and a rerun with the runs in place only rewrites the tables. Runs with the same options are
shared between studies (the stable preset is the base of several and is trained once).

Usage::

    python scripts/evidence.py                          # all studies (15 min on 2 quiet cores)
    python scripts/evidence.py --study schedulers --study notes
    python scripts/evidence.py --quick --study notes    # smoke run: 1 seed, 2 epochs

``--quick`` writes into ``runs/evidence-quick/`` and ``<results>/evidence-quick.md`` (plots in
``<results>/evidence-quick/``): its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
if str(ROOT / "src") not in sys.path:
    sys.path.insert(1, str(ROOT / "src"))

from evidence_claims import guide_claims  # noqa: E402
from evidence_report import write_markdown, write_plots  # noqa: E402
from evidence_results import StudyResult, read_cell, run_extras  # noqa: E402
from evidence_studies import (  # noqa: E402
    FULL,
    QUICK,
    STUDIES,
    Cell,
    Scale,
    Study,
    base_options,
    observed_clip,
)

from advanced_training_utils.app.compare import _folder_name, compare, tabulate  # noqa: E402
from advanced_training_utils.app.report.comparison import read_run  # noqa: E402
from advanced_training_utils.engine.config import TrainConfig  # noqa: E402

__all__ = ["config_key", "missing_options", "run_studies", "main"]

log = logging.getLogger("evidence")


def config_key(options: dict[str, Any]) -> str:
    """The configuration's name in compare (and its run folder): its options, sorted, as
    ``k=v`` joined by ``+`` (``stable`` for none), so equal options share their runs."""
    if not options:
        return "stable"
    parts = []
    for k in sorted(options):
        v = options[k]
        if isinstance(v, dict):
            v = ",".join(f"{a}={v[a]}" for a in sorted(v))
        parts.append(f"{k}={v}")
    return "+".join(parts)


def missing_options(study: Study, cell: Cell) -> list[str]:
    """The options of ``cell`` that ``train_model_advanced`` lacks (a feature not merged)."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    return [k for k in cell.options if k in study.needs and k not in known]


def _prepare(scale: Scale, tasks: set[str]) -> dict[str, Any]:
    """Render the emotion datasets once (not in each parallel run) and count the batches of an
    epoch on the whole training split (seed 0)."""
    ctx: dict[str, Any] = {"steps_per_epoch": 1}
    if "emotion" not in tasks:
        return ctx
    from advanced_training_utils.app.data import emotion_dataset
    from advanced_training_utils.app.tasks import TASK_OPTIONS

    for seed in range(scale.seeds):
        d = emotion_dataset(seed=seed, per_piece=scale.per_piece, variant="varied")
        if seed == 0:
            n = int((d["split"] == 0).sum())
            ctx["steps_per_epoch"] = math.ceil(n / TASK_OPTIONS["emotion"]["batch_size"])
    return ctx


def _cells(study: Study, scale: Scale, ctx: dict[str, Any], phase: int
           ) -> tuple[list[tuple[Cell, str, dict[str, Any]]], list[str]]:
    """The study's cells of ``phase`` (new ones only) as (cell, key, options), and the skipped."""
    done = {c.label for c in study.cells(scale, {**ctx, "phase": phase - 1})} if phase > 1 else set()
    out, skipped = [], []
    for cell in study.cells(scale, {**ctx, "phase": phase}):
        if cell.label in done:
            continue
        missing = missing_options(study, cell)
        if missing:
            skipped.append(f"{cell.label}: needs {', '.join(study.needs[m] for m in missing)} "
                           f"({', '.join(missing)}), not in this version")
            continue
        out.append((cell, config_key(cell.options), {**base_options(scale, study.task),
                                                     **cell.options}))
    return out, skipped


def _cost(options: dict[str, Any]) -> float:
    return float(options.get("train_fraction", 1.0))


def _run(task: str, planned: list[tuple[Cell, str, dict[str, Any]]], scale: Scale,
         scratch: Path, epochs: int) -> tuple[list[str], int]:
    """Run every planned configuration of ``task`` (the costliest first); the failures and
    how many runs were not finished before."""
    configs: dict[str, dict[str, Any]] = {}
    for _, key, opts in sorted(planned, key=lambda p: -_cost(p[2])):
        configs.setdefault(key, opts)
    if not configs:
        return [], 0
    todo = sum(not (d / "summary.json").is_file() for key in configs
               for d in _run_dirs(scratch, task, key, scale.seeds))
    t0 = time.perf_counter()
    res = compare(configs, seeds=scale.seeds, task=task, out=scratch / task, epochs=epochs,
                  jobs=scale.jobs)
    log.info("evidence: %s: %d configurations x %d seeds in %.0f s", task, len(configs),
             scale.seeds, time.perf_counter() - t0)
    return list(res.failed), todo


def _run_dirs(scratch: Path, task: str, key: str, seeds: int) -> list[Path]:
    return [scratch / task / "runs" / _folder_name(key) / f"seed{s}" for s in range(seeds)]


def _target(sr: StudyResult) -> float | None:
    """The target of epochs-to-target: the monitored value (val_loss) that 3 of 4 runs of the
    study reach (the 75th percentile of their best values), rounded up to three significant
    digits (so those runs still reach it)."""
    best = sorted(r.best_value for c in sr.cells for r in c.runs
                  if r.best_value is not None and math.isfinite(r.best_value))
    if not best:
        return None
    v = best[min(len(best) - 1, math.ceil(0.75 * len(best)) - 1)]
    if v <= 0:
        return v
    q = 10.0 ** (math.floor(math.log10(v)) - 2)
    return float(f"{math.ceil(v / q - 1e-9) * q:.3g}")


def _observed(scratch: Path, scale: Scale) -> float:
    """The clipping study's observed threshold (:func:`observed_clip`) from the unclipped
    stable runs."""
    key = config_key({"gradient_clip": None})
    norms: list[float] = []
    for d in _run_dirs(scratch, "emotion", key, scale.seeds):
        if (d / "summary.json").is_file():
            norms += run_extras(read_run(d))["grad_norm_max"]
    return observed_clip(norms)


def _phase_plan(studies: list[Study], scale: Scale, ctx: dict[str, Any], phase: int,
                plan: dict[str, list], skipped: dict[str, list[str]]) -> dict[str, list]:
    """Add each study's cells of ``phase`` to ``plan`` (study -> [(cell, key, options)]);
    return them grouped by task."""
    by_task: dict[str, list] = {}
    for st in studies:
        if phase > st.phases:
            continue
        cells, skip = _cells(st, scale, ctx, phase)
        plan.setdefault(st.name, []).extend(cells)
        skipped.setdefault(st.name, []).extend(skip)
        by_task.setdefault(st.task, []).extend(cells)
    return by_task


def run_studies(names: list[str], scale: Scale, scratch: Path
                ) -> tuple[dict[str, StudyResult], int]:
    """Run the studies ``names`` (phase by phase, a task's runs in one comparison) and read
    their results; also how many runs were trained (not finished before)."""
    studies = [STUDIES[n] for n in names]
    ctx = _prepare(scale, {s.task for s in studies})
    plan: dict[str, list] = {}
    skipped: dict[str, list[str]] = {}
    failed: list[str] = []
    trained = 0
    for phase in (1, 2):
        if phase == 2 and any(s.phases >= 2 for s in studies):
            ctx["observed_clip"] = _observed(scratch, scale)
        by_task = _phase_plan(studies, scale, ctx, phase, plan, skipped)
        for task in sorted(by_task, key=lambda t: t != "emotion"):
            epochs = scale.notes_epochs if task == "notes" else scale.epochs
            f, n = _run(task, by_task[task], scale, scratch, epochs)
            failed, trained = failed + f, trained + n
    results = {}
    for st in studies:
        epochs = scale.notes_epochs if st.task == "notes" else scale.epochs
        cells = [read_cell(c, k, _run_dirs(scratch, st.task, k, scale.seeds))
                 for c, k, _ in plan[st.name]]
        sr = StudyResult(st.name, st.title, st.task, st.what, epochs, cells,
                         skipped=skipped[st.name])
        sr.target = _target(sr) if st.with_target else None
        sr.failed = [f for f in failed if any(f.startswith(k + " ") for _, k, _ in plan[st.name])]
        if "observed_clip" in ctx and st.phases >= 2:
            sr.notes.append(f"observed threshold: {ctx['observed_clip']:g} (the median "
                            "per-epoch maximum pre-clip norm of the unclipped stable runs)")
        sr.notes += _recovery_note(sr)
        results[st.name] = sr
    return results, trained


def _recovery_note(sr: StudyResult) -> list[str]:
    """Whether divergence recovery acted in a study that runs with and without it."""
    if not any(c.cell.options.get("recovery") is False for c in sr.cells):
        return []
    acted = sum(e.get("rollbacks", 0) + e.get("skipped", 0) for c in sr.cells
                for e in c.extras if c.cell.options.get("recovery") is not False)
    if acted:
        return [f"divergence recovery acted: {acted:g} rollbacks and skipped steps in all"]
    return ["divergence recovery never acted (0 rollbacks, 0 skipped steps in every run with "
            "it): with and without it, each configuration's runs are the same"]


def _tables(results: dict[str, StudyResult], scratch: Path) -> None:
    """Each study's compare.md/csv and curves.png under the scratch folder (as compare writes
    them, rows named by the cells' labels)."""
    for sr in results.values():
        dirs = [d for c in sr.cells for d in c.run_dirs]
        labels = [c.cell.label for c in sr.cells for _ in c.run_dirs]
        tabulate(dirs, scratch / "studies" / sr.name, target=sr.target, configs=labels)


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", action="append", choices=list(STUDIES), default=None,
                   help="a study to run (repeatable; default: all)")
    p.add_argument("--quick", action="store_true", help="smoke mode: 1 seed, 2 epochs, tiny data")
    p.add_argument("--jobs", type=int, default=None, help="parallel runs (default: 2; quick 1)")
    p.add_argument("--scratch", type=Path, default=None,
                   help="the run folders (default: runs/evidence, quick: runs/evidence-quick)")
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results",
                   help="where evidence.md and evidence/*.png go")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the studies and write the results; 0, or 1 when a run failed."""
    args = _args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    scale = QUICK if args.quick else FULL
    if args.jobs is not None:
        scale = dataclasses.replace(scale, jobs=args.jobs)
    stem = "evidence-quick" if args.quick else "evidence"
    scratch = args.scratch or ROOT / "runs" / stem
    names = args.study or list(STUDIES)
    meta = {"scratch": _rel(scratch), "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "load_before": _load(), "scale": dataclasses.asdict(scale),
            "command": "python scripts/evidence.py" + "".join(f" --study {n}" for n in args.study or [])
            + (" --quick" if args.quick else "")}
    t0 = time.perf_counter()
    results, trained = run_studies(names, scale, scratch)
    meta.update(wall_seconds=time.perf_counter() - t0, load_after=_load(), runs_trained=trained)
    meta = _keep_timing(meta, scratch / "evidence_meta.json")
    _tables(results, scratch)
    plots = write_plots(results, args.results / stem)
    md = args.results / f"{stem}.md"
    write_markdown(md, results, guide_claims(results), meta, plots, ROOT)
    (scratch / "evidence_meta.json").write_text(json.dumps(meta, indent=2, default=str))
    log.info("evidence: wrote %s and %d plots (this invocation: %.0f s)", md, len(plots),
             time.perf_counter() - t0)
    return 1 if any(sr.failed for sr in results.values()) else 0


def _keep_timing(meta: dict[str, Any], previous: Path) -> dict[str, Any]:
    """When this invocation trained nothing (every run was finished), the timing of the one
    that trained the runs (same command and scale), marked as rewritten now."""
    try:
        old = json.loads(previous.read_text())
    except (OSError, ValueError):
        return meta
    now = json.loads(json.dumps(meta, default=str))  # tuples as lists, as they were saved
    same = all(old.get(k) == now[k] for k in ("scale", "command"))
    if meta["runs_trained"] or not same or not old.get("runs_trained"):
        return meta
    return {**old, "rewritten": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def _rel(path: Path) -> str:
    try:
        return path.resolve().relative_to(ROOT).as_posix()
    except ValueError:
        return str(path)


def _load() -> float | None:
    try:
        import os

        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


if __name__ == "__main__":
    sys.exit(main())

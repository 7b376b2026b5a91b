"""``advtrain compare``: N configurations x S seeds on a task or your audio, one table and plot.

    advtrain compare (--task T | --data D [--target-column C ...]) --preset A --preset B
                     [--config F.yaml]... [--set key=v1,v2]... --seeds S [--seed-base B]
                     [--epochs E] [--device D] --out DIR [--jobs J] [--target VALUE]
                     [--run-reports]

Configurations: each ``--preset`` is one (the task's defaults and the preset), each ``--config``
file is one (the task's defaults, the ``stable`` preset, then the file, as ``advtrain train
--config`` layers them). Each ``--set key=v1,v2`` is a grid axis: every configuration is run with
each value (the cartesian product over the axes); a ``--set`` with one value applies to all.
Values are YAML and split on the commas outside brackets and quotes (``--set
metrics=[accuracy,uar]`` is one value). A configuration is named by its preset or file stem (with
its last folders when files share a stem or a preset's name: ``tune1/best``) and
the grid values it takes, e.g. ``stable+scheduler_type=cosine``. Each configuration runs with the
seeds ``B..B+S-1`` (``--seed-base`` 0); ``--epochs`` and ``--device`` apply to all.

Each run is an ordinary run directory of ``advtrain train`` (:func:`.cli.train_run`):
``DIR/runs/<config>/seed<k>/`` with ``checkpoints/``, ``metrics.jsonl``, ``summary.json``,
plus ``compare_run.json`` (the run's resolved options); its ``report.png`` and
``diagnosis.txt`` with ``--run-reports`` (or later: ``advtrain report DIR/runs/<config>/seed<k>``).
A run whose ``summary.json`` is readable is finished and never rerun; an unfinished one resumes
from its last checkpoint: run the same command again after an interruption (a run folder whose
options differ from the command's is refused). Runs go one after another in this process (``--jobs 1``) or as
``J`` parallel processes (each with one torch thread; its output in the run's ``compare.log``;
its peak resident memory in the run's ``peak_rss.json``, ``{"peak_rss_mb": MiB}``).
A failed run is listed in the table and the exit code is 1; it is retried by the next command.

Outputs: ``DIR/compare.md`` and ``DIR/compare.csv`` (one row per configuration: the monitored
value at the best epoch and at the last, and the held-out test metric, each as mean, standard
deviation (ddof=1) and 95% Student-t interval of the mean over the seeds; the mean wall time;
the mean best epoch; with ``--target``, how many runs reached the target and the mean epochs and
training seconds to reach it), ``DIR/runs.csv`` (one row per run) and ``DIR/curves.png`` (the
monitored value per epoch: the mean over the seeds, a band from their min to their max). See
:mod:`.report.comparison`.

Python::

    from advanced_training_utils.app.compare import compare
    result = compare({"plateau": {"scheduler_type": "plateau"},
                      "cosine": {"preset": "fast", "scheduler_type": "cosine"}},
                     seeds=3, task="notes", out="cmp", epochs=10, jobs=2)
    result.rows[0].best.mean
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..engine.presets import PRESET_ALIASES, PRESETS
from ..safeio import atomic_write
from .cli import CLIError, _HelpFormatter, _parse_sets, _read_config, layer_options, train_run
from .report.comparison import (
    ConfigRow,
    RunResult,
    plot_curves,
    read_run,
    summarize,
    write_tables,
)

__all__ = ["ComparisonResult", "RunSpec", "add_parser", "compare", "configurations", "execute",
           "main", "plan_runs", "run_spec_file", "tabulate"]

log = logging.getLogger(__name__)

#: The preset under a configuration that names none (a --config file, an API dict).
DEFAULT_PRESET = "stable"
#: A run directory's record of what it runs (compared on every later command).
SPEC_FILE = "compare_run.json"
#: A parallel worker's peak resident memory (written after its run; see _write_peak_rss).
PEAK_RSS_FILE = "peak_rss.json"
#: Options a later command may change for a recorded run.
_FREE = ("device", "verbose")

_EPILOG = """\
Examples:
  advtrain compare --task notes --preset fast --preset stable --seeds 3 --out cmp/presets
  advtrain compare --task notes --preset stable --set scheduler_type=plateau,cosine,onecycle \\
                   --seeds 3 --epochs 10 --jobs 2 --target 0.08 --out cmp/schedulers
  advtrain compare --data wavs/ --preset fast --config mine.yaml --seeds 2 --out cmp/mine"""


@dataclass(frozen=True)
class RunSpec:
    """One run of a comparison: a configuration at a seed, its options resolved and checked."""

    config: str
    seed: int
    run_dir: Path
    task: str
    preset: str
    options: dict[str, Any]       # train_model_advanced's (as cli.layer_options returns them)
    task_options: dict[str, Any]
    data: dict[str, Any] | None   # the DataSpec fields of --data

    def record(self) -> dict[str, Any]:
        """What ``compare_run.json`` holds (plain JSON types)."""
        d = asdict(self)
        d.pop("run_dir")
        return json.loads(json.dumps(d, default=str))


@dataclass(frozen=True)
class ComparisonResult:
    """What :func:`compare` found: the table's rows, the finished runs, the failed ones
    (``"config seed k: error"``), and the files written."""

    rows: list[ConfigRow]
    runs: list[RunResult]
    failed: list[str]
    files: list[Path]


def _folder_name(config: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+=,-]", "_", config)[:200] or "_"


def _data_spec(data: Any) -> Any:
    from .usertask import DataSpec

    return data if isinstance(data, DataSpec) or data is None else DataSpec(Path(data))


def plan_runs(configs: Mapping[str, Mapping[str, Any]], seeds: Sequence[int], out: Path, *,
              task: str | None = None, data: Any = None, epochs: int | None = None,
              device: str | None = None) -> list[RunSpec]:
    """Every run of the comparison, its options resolved and checked before any work.

    Args:
        configs: name -> options (train_model_advanced's and the task's, e.g. ``per_piece``;
            ``"preset"`` names the preset under them, default ``stable``).
        seeds: the seeds each configuration runs with.
        out: the comparison's folder (runs in ``out/runs/<config>/seed<k>``).
        task, data: a built-in task's name, or ``data`` (a folder, or a
            :class:`~.usertask.DataSpec` for a labels CSV); exactly one.

    Raises:
        CLIError: no configuration or seed, both or neither of task and data, a bad option.
    """
    from .usertask import AUDIO_TASK, plan_audio

    if not configs:
        raise CLIError("no configuration to compare: give --preset and/or --config")
    if not seeds:
        raise CLIError("no seed: --seeds must be >= 1")
    if (task is None) == (data is None):
        raise CLIError("give exactly one of --task (a built-in task) and --data (your audio)")
    spec = _data_spec(data)
    try:
        plan = plan_audio(spec) if spec is not None else None
    except (OSError, ValueError) as e:
        raise CLIError(str(e)) from None
    name = AUDIO_TASK if spec is not None else str(task)
    folders: dict[str, str] = {}
    runs = []
    for config, opts in configs.items():
        folder = _folder_name(config)
        if folder in folders:
            raise CLIError(f"configurations {folders[folder]!r} and {config!r} share the folder "
                           f"name {folder!r}; rename one")
        folders[folder] = config
        opts = dict(opts)
        preset = str(opts.pop("preset", DEFAULT_PRESET))
        for seed in seeds:
            options, task_opts = layer_options(name, plan, preset, [(f"configuration {config}",
                                               opts)], epochs=epochs, device=device,
                                               seed=seed, quiet=True)
            runs.append(RunSpec(config, seed, out / "runs" / folder / f"seed{seed}", name, preset,
                                options, task_opts, _spec_fields(spec)))
    return runs


def _spec_fields(spec: Any) -> dict[str, Any] | None:
    if spec is None:
        return None
    d = asdict(spec)
    d["data"] = str(Path(d["data"]).resolve())
    return d


def _finished(run_dir: Path) -> bool:
    """Whether the run directory's summary.json is complete (it is written last, atomically)."""
    try:
        return isinstance(json.loads((run_dir / "summary.json").read_text()).get("options"),
                          dict)
    except (OSError, ValueError, AttributeError):
        return False


def _check_recorded(run: RunSpec) -> None:
    """Refuse a run directory made by another command (other options, task or data)."""
    path = run.run_dir / SPEC_FILE
    if not path.is_file():
        return
    try:
        old = json.loads(path.read_text())
    except ValueError:
        return  # cut short by a kill: it is rewritten before the run starts
    new = run.record()
    for rec in (old, new):  # where and how loudly a run trains do not change what it computes
        for k in _FREE:
            rec.get("options", {}).pop(k, None)
    if old != new:
        diff = sorted(k for k in {**old.get("options", {}), **new["options"]}
                      if old.get("options", {}).get(k) != new["options"].get(k))
        diff += [k for k in ("task", "preset", "task_options", "data") if old.get(k) != new[k]]
        raise CLIError(f"{run.run_dir} holds a run of other options ({', '.join(diff)}) than "
                       f"this command's {run.config!r} seed {run.seed}; choose another --out")


def _write_record(run: RunSpec) -> None:
    run.run_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(run.record(), indent=2) + "\n"
    atomic_write(run.run_dir / SPEC_FILE, lambda f: f.write(text.encode()))


def execute(run: RunSpec, report: bool = False) -> dict[str, Any]:
    """Train ``run`` into its run directory (resuming its checkpoint if it has one; with
    ``report``, writing its report.png and diagnosis.txt); return the summary."""
    from .usertask import DataSpec, plan_audio

    plan = None
    if run.data is not None:
        plan = plan_audio(DataSpec(**{**run.data, "data": Path(run.data["data"])}))
    resume = (run.run_dir / "checkpoints" / f"{run.task}_last.pt").is_file()
    summary, _ = train_run(run.run_dir, run.task, dict(run.options), dict(run.task_options),
                           plan=plan, preset=run.preset, resume=resume, report=report)
    return summary or {}


def run_spec_file(path: str | Path, report: bool = False) -> int:
    """A parallel worker's entry: run the :class:`RunSpec` recorded in ``path`` with one torch
    thread; exit code 0, or 1 with the error on stderr (143/130 after SIGTERM/SIGINT)."""
    import torch

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    torch.set_num_threads(1)
    _die_with_parent()
    d = json.loads(Path(path).read_text())
    run = RunSpec(run_dir=Path(path).parent, **d)
    try:
        execute(run, report)
    except Exception as e:  # noqa: BLE001 (any error fails this run alone)
        print(f"advtrain compare: {run.config} seed {run.seed}: {type(e).__name__}: {e}",
              file=sys.stderr)
        return 1
    _write_peak_rss(run.run_dir)
    return 0


def _write_peak_rss(run_dir: Path) -> None:
    """Record this worker's peak resident memory in ``run_dir/peak_rss.json`` (``peak_rss_mb``,
    MiB: data, model, training and test of this one run; Unix only, nothing elsewhere)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    mb = peak / 2**20 if sys.platform == "darwin" else peak / 1024
    text = json.dumps({"peak_rss_mb": round(mb, 1)}) + "\n"
    atomic_write(run_dir / PEAK_RSS_FILE, lambda f: f.write(text.encode()))


def _die_with_parent() -> None:
    """Linux: SIGTERM this worker when the comparison process dies (it checkpoints and exits),
    so a killed comparison leaves no run holding its folder's lock."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


_WORKER = ("import sys; from advanced_training_utils.app.compare import run_spec_file; "
           "sys.exit(run_spec_file(sys.argv[1], sys.argv[2] == 'report'))")


def _start(run: RunSpec, report: bool) -> subprocess.Popen[bytes]:
    src = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=src + os.pathsep + os.environ.get("PYTHONPATH", ""))
    log_file = (run.run_dir / "compare.log").open("ab")
    try:
        return subprocess.Popen([sys.executable, "-c", _WORKER, str(run.run_dir / SPEC_FILE),
                                 "report" if report else "-"], env=env, stdout=log_file,
                                stderr=subprocess.STDOUT)
    finally:
        log_file.close()


def _run_parallel(runs: list[RunSpec], jobs: int, report: bool) -> list[str]:
    """Run ``runs`` as up to ``jobs`` processes at a time; return the failures. SIGTERM/SIGINT
    is passed to the running workers (each checkpoints), then raises TrainingPreempted."""
    from ..engine.preemption import TrainingPreempted

    pending = list(enumerate(runs))
    running: dict[int, subprocess.Popen[bytes]] = {}
    failed: list[str] = []
    stop: list[int] = []

    def forward(signum: int, frame: Any) -> None:
        log.warning("compare: signal %d: stopping the %d running run(s) (each writes a "
                    "checkpoint); run the same command again to continue", signum, len(running))
        stop.append(signum)
        for p in running.values():
            p.send_signal(signum)

    previous = {}
    try:
        previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    except ValueError:  # not the main thread: no handlers
        pass
    try:
        while running or (pending and not stop):
            while pending and len(running) < jobs and not stop:
                i, run = pending.pop(0)
                running[i] = _start(run, report)
            time.sleep(0.1)
            for i, p in list(running.items()):
                if p.poll() is not None:
                    del running[i]
                    if not stop:
                        _log_done(runs[i], p.returncode, failed)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        for p in running.values():  # leaving by an exception: stop the workers
            p.terminate()
            p.wait()
    if stop:
        raise TrainingPreempted(stop[0], None)
    return failed


def _log_done(run: RunSpec, rc: int, failed: list[str]) -> None:
    if rc == 0 and _finished(run.run_dir):
        log.info("compare: %s seed %d finished", run.config, run.seed)
        return
    tail = (run.run_dir / "compare.log").read_text(errors="replace").strip().splitlines()
    failed.append(f"{run.config} seed {run.seed}: exit code {rc}: "
                  f"{tail[-1] if tail else 'no output'}")
    log.error("compare: %s", failed[-1])


def _run_here(runs: list[RunSpec], report: bool) -> list[str]:
    """Run ``runs`` one after another in this process; return the failures."""
    failed = []
    for i, run in enumerate(runs, 1):
        log.info("compare: run %d/%d: %s seed %d", i, len(runs), run.config, run.seed)
        try:
            execute(run, report)
        except Exception as e:  # noqa: BLE001 (a diverged or broken run fails alone)
            log.debug("compare: %s seed %d failed", run.config, run.seed, exc_info=True)
            failed.append(f"{run.config} seed {run.seed}: {type(e).__name__}: {e}")
            log.error("compare: %s", failed[-1])
    return failed


def compare(configs: Mapping[str, Mapping[str, Any]], seeds: int | Sequence[int], *,
            out: str | Path, task: str | None = None, data: Any = None, jobs: int = 1,
            epochs: int | None = None, device: str | None = None,
            target: float | None = None, run_reports: bool = False) -> ComparisonResult:
    """Run every configuration with every seed into ``out/runs/`` (skipping finished runs,
    resuming unfinished ones) and write the table and plot (:func:`tabulate`).

    Args:
        configs: name -> options (see :func:`plan_runs`); the name is the table's row.
        seeds: S (the seeds 0..S-1) or the seeds themselves.
        out: the comparison's folder.
        task, data: a built-in task's name, or your audio (a folder, or a
            :class:`~.usertask.DataSpec`); exactly one.
        jobs: runs at a time (parallel processes when > 1, one torch thread each).
        epochs, device: for every run (None: each configuration's own).
        target: the monitored value to reach (epochs and seconds to it in the table).
        run_reports: write each run's report.png and diagnosis.txt (about 2 s a run; ``advtrain
            report RUN_DIR`` writes them later).

    Raises:
        CLIError: a bad argument or option (before any run), or ``out`` holding other runs.
        TrainingPreempted: SIGTERM/SIGINT (the runs checkpointed; call again to continue).
    """
    if isinstance(seeds, int):
        if seeds < 1:
            raise CLIError(f"--seeds must be >= 1, got {seeds}")
        seeds = range(seeds)
    if jobs < 1:
        raise CLIError(f"--jobs must be >= 1, got {jobs}")
    if target is not None and not math.isfinite(target):
        raise CLIError(f"--target must be a finite number, got {target}")
    out = Path(out)
    runs = plan_runs(configs, list(seeds), out, task=task, data=data, epochs=epochs,
                     device=device)
    for run in runs:
        _check_recorded(run)
    todo = [r for r in runs if not _finished(r.run_dir)]
    log.info("compare: %d runs, %d finished before, %d to run", len(runs),
             len(runs) - len(todo), len(todo))
    for run in todo:
        _write_record(run)
    failed = (_run_here(todo, run_reports) if jobs == 1
              else _run_parallel(todo, jobs, run_reports))
    return tabulate([r.run_dir for r in runs], out, target=target, failed=failed,
                  configs=[r.config for r in runs])


def tabulate(run_dirs: Sequence[Path], out: Path, *, target: float | None = None,
           failed: Sequence[str] = (), configs: Sequence[str] | None = None
           ) -> ComparisonResult:
    """Write ``compare.md``, ``compare.csv``, ``runs.csv`` and ``curves.png`` into ``out`` from
    the finished ones of ``run_dirs`` (``configs``: their configuration names; default each
    folder's parent's name). An unfinished run is left out (and logged)."""
    names = list(configs) if configs is not None else [Path(d).parent.name for d in run_dirs]
    results = []
    for d, name in zip(run_dirs, names, strict=True):
        if _finished(Path(d)):
            results.append(read_run(Path(d), config=name))
        else:
            log.warning("compare: %s is not finished; left out of the table", d)
    rows = summarize(results, target=target)
    files = write_tables(rows, results, out, failed)
    files.append(plot_curves(results, out / "curves.png"))
    return ComparisonResult(rows, results, list(failed), files)


# ---- the command line

def _split_values(text: str) -> list[str]:
    """``text`` split on the commas outside brackets, braces and quotes."""
    parts, depth, quote, cur = [], 0, "", ""
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
            continue
        cur += ch
    return [*parts, cur]


def _grid(sets: list[str]) -> tuple[dict[str, Any], list[tuple[str, list[Any], list[str]]]]:
    """``--set`` items: (the single-valued ones, the axes ``(key, values, their texts)``)."""
    fixed: dict[str, Any] = {}
    axes = []
    for item in sets:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise CLIError(f"--set expects KEY=VALUE or KEY=V1,V2,..., got {item!r}")
        texts = [t.strip() for t in _split_values(value)]
        if len(texts) > 1 and any(not t for t in texts):
            raise CLIError(f"--set {key.strip()}: an empty value in {value!r}")
        values = [_parse_sets([f"{key}={t}"])[key.strip()] for t in texts]
        if len(values) == 1:
            fixed[key.strip()] = values[0]
        else:
            axes.append((key.strip(), values, texts))
    return fixed, axes


def _file_names(paths: Sequence[Path], taken: set[str]) -> list[str]:
    """Each config file's name: its stem, or as many of its last folders as tell it apart
    from another file with that stem (``tune1/best``, ``tune2/best``) or from a preset."""
    def tail(path: Path, k: int) -> str:
        return "/".join(path.with_suffix("").parts[-k:])

    names = []
    for path in paths:
        others = [q for q in paths if q.resolve() != path.resolve()]
        k = 1
        while k < len(path.parts) and (tail(path, k) in taken
                                       or any(tail(q, k) == tail(path, k) for q in others)):
            k += 1
        names.append(tail(path, k))
    return names


def configurations(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The configurations of a ``compare`` command: name -> options."""
    bases: list[tuple[str, dict[str, Any]]] = []
    for p in args.presets:
        if p not in PRESETS and p not in PRESET_ALIASES:
            raise CLIError(f"unknown preset {p!r}; valid presets: "
                           + ", ".join([*PRESETS, *PRESET_ALIASES]))
        bases.append((p, {"preset": p}))
    for path, name in zip(args.configs, _file_names(args.configs, set(args.presets)),
                          strict=True):
        bases.append((name, _read_config(path)))
    if not bases:
        raise CLIError("no configuration to compare: give --preset and/or --config")
    fixed, axes = _grid(args.sets)
    out: dict[str, dict[str, Any]] = {}
    for base, opts in bases:
        for combo in itertools.product(*[list(zip(v, t, strict=True)) for _, v, t in axes]):
            name = "+".join([base, *(f"{k}={t}" for (k, _, _), (_, t) in zip(axes, combo,
                                                                              strict=True))])
            if name in out:
                raise CLIError(f"configuration {name!r} given twice")
            out[name] = {**opts, **fixed, **{k: v for (k, _, _), (v, _) in zip(axes, combo,
                                                                                strict=True)}}
    return out


def _target(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number: --target is the monitored value to reach (a CSV's label "
            "column is --target-column)") from None


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``advtrain compare``."""
    from .tasks import TASKS

    c = subparsers.add_parser(
        "compare", help="run configurations x seeds and tabulate the monitored metric",
        description="Run N configurations (--preset, --config, --set grids) x S seeds on a task "
        "or your audio; write DIR/compare.md, compare.csv, runs.csv and curves.png. Run it "
        "again to continue an interrupted comparison.", epilog=_EPILOG,
        formatter_class=_HelpFormatter)
    c.add_argument("--task", choices=TASKS, default=None, help="the built-in task (default: none: give --data)")
    d = c.add_argument_group("your own audio (instead of --task)")
    d.add_argument("--data", type=Path, default=None,
                   help="a labels .csv or a folder with one subfolder per class (default: none: "
                   "give --task)")
    d.add_argument("--target-column", default=None,
                   help="CSV label column(s), as advtrain train's --target (default: none)")
    for flag in ("--split-column", "--group-column"):
        d.add_argument(flag, default=None, help=f"as advtrain train's {flag} (default: none)")
    d.add_argument("--path-column", default="path", help="CSV column of the audio paths")
    c.add_argument("--preset", dest="presets", action="append", default=[],
                   help="a configuration: this preset (repeatable) (default: none)")
    c.add_argument("--config", dest="configs", action="append", default=[], type=Path,
                   help="a configuration: a YAML file over the stable preset (repeatable) "
                   "(default: none)")
    c.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=V1,V2",
                   help="a grid axis over every configuration (one value: applies to all) "
                   "(default: none)")
    c.add_argument("--seeds", type=int, required=True, help="seeds per configuration "
                   "(default: none, required)")
    c.add_argument("--seed-base", type=int, default=0, help="the first seed")
    c.add_argument("--epochs", type=int, default=None, help="epochs of every run "
                   "(default: each configuration's)")
    c.add_argument("--device", default=None, help="device of every run (default: auto)")
    c.add_argument("--out", type=Path, required=True, help="the comparison's folder (default: none, required)")
    c.add_argument("--jobs", type=int, default=1, help="runs at a time (parallel processes)")
    c.add_argument("--run-reports", action="store_true",
                   help="write each run's report.png and diagnosis.txt (about 2 s a run; "
                   "default: none, advtrain report RUN_DIR writes them later)")
    c.add_argument("--target", type=_target, default=None,
                   help="the monitored value to reach: epochs and seconds to it in the table "
                   "(default: none)")
    return c


def main(args: argparse.Namespace) -> int:
    """``advtrain compare``: 0, or 1 when a run failed; a bad argument is a CLIError (exit 2)."""
    from .usertask import DataSpec

    if args.seeds < 1:
        raise CLIError(f"--seeds must be >= 1, got {args.seeds}")
    if args.data is None and any(v is not None for v in (
            args.target_column, args.split_column, args.group_column)):
        raise CLIError("--target-column, --split-column and --group-column apply to --data only")
    data = None if args.data is None else DataSpec(
        args.data, args.target_column, args.path_column, args.split_column, args.group_column)
    res = compare(configurations(args), range(args.seed_base, args.seed_base + args.seeds),
                  out=args.out, task=args.task, data=data, jobs=args.jobs, epochs=args.epochs,
                  device=args.device, target=args.target, run_reports=args.run_reports)
    print((args.out / "compare.md").read_text(), end="")
    print("wrote " + ", ".join(str(f) for f in res.files))
    return 1 if res.failed else 0

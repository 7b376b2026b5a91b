"""``advtrain``: train the built-in tasks, report on a run, list presets.

    advtrain train --task emotion|notes --preset fast|stable|memory_constrained --epochs N
                   --out DIR [--resume] [--seed S] [--device D] [--config FILE.yaml]
                   [--set key=value ...] [--nproc-per-node N]
    advtrain report DIR
    advtrain presets

Options are layered, later wins: the task's defaults, the preset, the YAML config file, ``--set``,
then the explicit flags (``--epochs``, ``--seed``, ``--device``). A run directory holds
``checkpoints/``, ``metrics.jsonl``, ``summary.json``, ``report.png`` and ``diagnosis.txt``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from .config import TrainConfig
from .presets import PRESET_ALIASES, PRESETS, get_preset

__all__ = ["main", "build_parser", "resolve_options", "write_report"]

log = logging.getLogger("advanced_training_utils.cli")

# Options the CLI sets itself from the run directory; not settable by --set or a config file.
_RESERVED = {"checkpoint_dir", "model_name", "metrics_file", "resume", "optimizer", "augment"}


class CLIError(Exception):
    """A user error: printed as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    from .tasks import TASKS

    p = argparse.ArgumentParser(prog="advtrain", description="Train and inspect the built-in "
                                "audio-emotion and emotion-to-notes tasks.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a built-in task into a run directory")
    t.add_argument("--task", choices=TASKS, default="emotion")
    t.add_argument("--preset", default="stable",
                   help="one of: " + ", ".join([*PRESETS, *PRESET_ALIASES]))
    t.add_argument("--epochs", type=int, default=None)
    t.add_argument("--out", type=Path, default=Path("runs/latest"))
    t.add_argument("--resume", action="store_true", help="continue the run in --out")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:N, mps")
    t.add_argument("--config", type=Path, default=None, help="YAML file of options")
    t.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override one option (repeatable); VALUE is parsed as YAML")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--nproc-per-node", type=int, default=1, metavar="N",
                   help="launch N processes on this machine through torch.distributed.run (DDP)")
    r = sub.add_parser("report", help="write report.png and the diagnosis for a run directory")
    r.add_argument("run_dir", type=Path)
    sub.add_parser("presets", help="list the presets and their options")
    return p


def _valid_keys(task: str) -> list[str]:
    from .tasks import TASK_OPTIONS

    train = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in _RESERVED]
    return sorted(set(train) | set(TASK_OPTIONS[task]))


def _check_keys(where: str, options: dict[str, Any], task: str) -> None:
    valid = _valid_keys(task)
    bad = sorted(k for k in options if k not in valid)
    if bad:
        raise CLIError(f"{where}: unknown option(s) {', '.join(bad)}; valid options: "
                       + ", ".join(valid))


def _parse_sets(sets: list[str]) -> dict[str, Any]:
    out = {}
    for item in sets:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise CLIError(f"--set expects KEY=VALUE, got {item!r}")
        out[key.strip()] = yaml.safe_load(value) if value.strip() else None
    return out


def resolve_options(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """Layer the options; return (train options, task options)."""
    from .tasks import TASK_OPTIONS, TASK_TRAIN_DEFAULTS

    if args.preset not in PRESETS and args.preset not in PRESET_ALIASES:
        raise CLIError(f"unknown preset {args.preset!r}; valid presets: "
                       + ", ".join([*PRESETS, *PRESET_ALIASES]))
    merged: dict[str, Any] = {**TASK_TRAIN_DEFAULTS[args.task], **get_preset(args.preset)}
    if args.config is not None:
        if not args.config.is_file():
            raise CLIError(f"--config: no such file {args.config}")
        try:
            loaded = yaml.safe_load(args.config.read_text()) or {}
        except yaml.YAMLError as e:
            raise CLIError(f"--config {args.config}: not valid YAML ({e})") from None
        if not isinstance(loaded, dict):
            raise CLIError(f"--config {args.config}: expected a mapping of options, got "
                           f"{type(loaded).__name__}")
        _check_keys(f"--config {args.config}", loaded, args.task)
        merged.update(loaded)
    sets = _parse_sets(args.sets)
    _check_keys("--set", sets, args.task)
    merged.update(sets)
    if args.epochs is not None:
        merged["epochs"] = args.epochs
    if args.device is not None:
        merged["device"] = args.device
    merged["seed"] = args.seed
    task_opts = {k: merged.pop(k) for k in list(merged) if k in TASK_OPTIONS[args.task]
                 and k not in {f.name for f in dataclasses.fields(TrainConfig)}}
    merged["verbose"] = not args.quiet and merged.get("verbose", True)
    try:
        TrainConfig.from_options(**merged)
    except (TypeError, ValueError) as e:
        raise CLIError(str(e)) from None
    return merged, task_opts


def _launch(args: argparse.Namespace, argv: list[str]) -> int:
    """Re-run this command under ``torch.distributed.run`` with N processes per node.

    torchrun runs in a session of its own, so a terminal's Ctrl-C or a scheduler's SIGTERM
    reaches this launcher alone, which forwards the first SIGTERM/SIGINT to torchrun; torchrun
    passes it to every worker (each finishes its step, writes its preemption checkpoint and exits
    with 128 + the signal number) and kills any worker still alive after its shutdown timeout
    (30 s). Later signals are not forwarded: a second one would interrupt torchrun's shutdown
    and leave the workers running without it.

    Returns:
        torchrun's exit code; after a forwarded signal, 128 + that signal's number (143 for
        SIGTERM, 130 for SIGINT) when torchrun did not exit cleanly (it exits with 1 then).
    """
    import signal
    import subprocess

    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--nproc-per-node":
            skip = True
            continue
        if a.startswith("--nproc-per-node="):
            continue
        rest.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={args.nproc_per_node}", "-m", "advanced_training_utils", *rest]
    log.info("launching: %s", " ".join(cmd))
    forwarded: list[int] = []
    started: list[subprocess.Popen[bytes]] = []

    def forward(signum: int, frame: Any) -> None:
        if forwarded:
            log.warning("advtrain: signal %d: already stopping; waiting for the workers", signum)
            return
        forwarded.append(signum)
        log.warning("advtrain: signal %d: stopping the workers (each writes a checkpoint)",
                    signum)
        if started and started[0].poll() is None:
            started[0].send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        proc = subprocess.Popen(cmd, start_new_session=True)
        started.append(proc)
        if forwarded:  # a signal came before torchrun existed
            proc.send_signal(forwarded[0])
        rc = proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if started and started[0].poll() is None:  # leaving by an exception: stop torchrun
            started[0].terminate()
            started[0].wait()
    return 128 + forwarded[0] if forwarded and rc != 0 else rc


def _train(args: argparse.Namespace, argv: list[str]) -> int:
    import torch

    from .distributed import env_world_size
    from .tasks import build_task
    from .train import resolve_device, train_model_advanced

    if args.nproc_per_node < 1:
        raise CLIError(f"--nproc-per-node must be >= 1, got {args.nproc_per_node}")
    if args.nproc_per_node > 1 and env_world_size() == 1:
        resolve_options(args)  # report option errors before launching anything
        return _launch(args, argv)
    options, task_opts = resolve_options(args)
    out: Path = args.out
    ckpt_dir = out / "checkpoints"
    if out.exists() and not args.resume and (ckpt_dir / f"{args.task}_last.pt").exists():
        log.info("%s already holds a run; starting over (pass --resume to continue it)", out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    task = build_task(args.task, args.seed, task_opts)
    data_seconds = time.perf_counter() - t0
    log.info("task %s: %s (data ready in %.1fs)", args.task, task.info, data_seconds)
    res = train_model_advanced(
        task.model, task.train_loader, task.val_loader, task.criterion,
        checkpoint_dir=ckpt_dir, model_name=args.task, metrics_file=out / "metrics.jsonl",
        resume=bool(args.resume), **options)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # rank 0 evaluates and writes the summary and report
    device = resolve_device(options.get("device", "auto"))
    test = task.evaluate_test(task.model, device)
    summary = {
        "task": args.task, "preset": args.preset, "seed": args.seed,
        "device": str(device), "torch": torch.__version__,
        "epochs_run": res["epochs_run"], "best_epoch": res["best_epoch"],
        "best_val_loss": res["best_val_loss"], "stopped_early": res["stopped_early"],
        "skipped_steps": res["skipped_steps"],
        "best_val_accuracy": max((h.get("val_accuracy") or 0.0 for h in res["history"]),
                                 default=None) if args.task == "emotion" else None,
        **test,
        "world_size": env_world_size(),
        "data": task.info, "data_seconds": round(data_seconds, 2),
        "wall_seconds": round(time.perf_counter() - t0, 2),
        "options": TrainConfig.from_options(**options).to_plain(), "task_options": task_opts,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    text = write_report(out)
    print(_headline(summary))
    print(text)
    return 0


def _headline(s: dict[str, Any]) -> str:
    if s["task"] == "emotion":
        return (f"emotion: held-out test accuracy {s['test_accuracy']:.3f} on "
                f"{s['test_examples']} clips (majority class {s['majority_baseline_accuracy']:.3f}); "
                f"best epoch {s['best_epoch']}/{s['epochs_run']}; {s['wall_seconds']:.0f}s")
    p = s["scale_degree_probe"]
    return (f"notes: held-out BCE {s['test_bce']:.4f} vs predict-the-mean {s['mean_baseline_bce']:.4f}; "
            f"P(E4) major {p['major']['E4']:.3f} / minor {p['minor']['E4']:.3f}, "
            f"P(Eb4) major {p['major']['Eb4']:.3f} / minor {p['minor']['Eb4']:.3f}")


def write_report(run_dir: Path) -> str:
    """Write ``report.png`` and ``diagnosis.txt`` for ``run_dir``; return the diagnosis text."""
    from .report import diagnose, format_diagnosis, plot_history

    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise CLIError(f"{run_dir} has no metrics.jsonl: is it a run directory of advtrain train?")
    history = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    if not history:
        raise CLIError(f"{metrics} is empty: no epoch finished yet")
    summary = run_dir / "summary.json"
    s = json.loads(summary.read_text()) if summary.is_file() else None
    text = format_diagnosis(diagnose(history, s["options"] if s else None), history)
    (run_dir / "diagnosis.txt").write_text(text + "\n")
    title = run_dir.name
    if s is not None:
        title = f"{s.get('task')} / {s.get('preset')}: " + (
            f"test accuracy {s['test_accuracy']:.3f}" if "test_accuracy" in s
            else f"test BCE {s.get('test_bce', float('nan')):.4f}")
    plot_history(history, run_dir / "report.png", title=title, diagnosis=text)
    return text


def _presets() -> int:
    for name, opts in PRESETS.items():
        alias = [a for a, n in PRESET_ALIASES.items() if n == name]
        print(f"{name}{' (alias: ' + ', '.join(alias) + ')' if alias else ''}")
        for k, v in opts.items():
            print(f"  {k}: {v}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``advtrain`` and ``python -m advanced_training_utils``."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        if args.command == "train":
            return _train(args, argv)
        if args.command == "report":
            if not args.run_dir.is_dir():
                raise CLIError(f"no such run directory: {args.run_dir}")
            print(write_report(args.run_dir))
            print(f"wrote {args.run_dir / 'report.png'}")
            return 0
        return _presets()
    except CLIError as e:
        print(f"advtrain: error: {e}", file=sys.stderr)
        return 2

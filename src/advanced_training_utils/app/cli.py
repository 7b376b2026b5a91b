"""``advtrain``: train the built-in tasks or your own audio, report on a run, list presets.

    advtrain train --task emotion|emotion-easy|notes --preset fast|stable|memory_constrained
                   --epochs N --out DIR [--resume] [--seed S] [--device D] [--config FILE.yaml]
                   [--set key=value ...] [--nproc-per-node N]
    advtrain train --data path/labels.csv --target emotion [--split-column split]
                   [--group-column speaker] [--path-column path] --out DIR [options as above]
    advtrain train --data path/folder/ --out DIR [options as above]
    advtrain compare --task T --preset A --preset B --seeds S --out DIR   (see app/compare.py)
    advtrain report DIR [--model-name NAME]
    advtrain tune (--task T | --data D) --space SPACE.yaml --trials N --out DIR [...] (app/tune)
    advtrain lr-find (--task T | --data D) --out DIR [--repeats R] [options as above]
    advtrain presets
    advtrain --version

``advtrain COMMAND --help`` shows each option's default and an example.

Options are layered, later wins: the task's defaults, the preset, the YAML config file, ``--set``,
then the explicit flags (``--epochs``, ``--seed``, ``--device``). ``seed`` follows the same rule
(``--seed`` > ``--set seed=`` > the config file > 0). A run directory holds ``checkpoints/``,
``metrics.jsonl``, ``summary.json``, ``report.png`` and ``diagnosis.txt`` (and, for the report,
``train_samples.npz``: a few training spectrograms; ``test_predictions.npz`` for regression).
The built-in tasks (:mod:`.tasks`): ``emotion`` (the default; chorale clips in their own keys,
a timbre, reverb and noise drawn per clip; task options ``batch_size``, ``per_piece`` and
``train_fraction``, a seeded share of the training melodies in (0, 1]), ``emotion-easy`` (the same
clips in C with one timbre: ~0.99 accuracy) and ``notes``.

Classification runs (``--task emotion``, ``emotion-easy`` and ``--data``) hold ``"test": {"uar", "macro_f1",
"accuracy", "per_class_recall", "confusion_matrix", "class_names"}`` in summary.json.

``--data`` (instead of ``--task``) trains on your own audio (:mod:`.usertask`): a labels CSV
(paths relative to its folder; one non-numeric ``--target`` column gives classification, one or
more numeric ones, ``--target valence,arousal``, regression) or a folder with one subfolder per
class. Its summary.json holds the held-out test metrics as ``"test": {"uar", "macro_f1",
"accuracy", "per_class_recall": {...}, "confusion_matrix", "class_names"}`` or ``"test": {"ccc", "ccc_<target>", "mae", ...}``,
and under ``"data"`` the split sizes, the training length (``crop_seconds``, ``crop_frames``),
the normalisation, the feature parameters and the skipped files with their problem. Its task
options (``--set``): batch_size, n_mels, features (speech / chorale), crop_seconds,
normalization, eval_crop, on_error, memory_budget.

``--set batch_size=auto`` (every task) lets the batch-size finder pick the largest micro-batch
that fits and keep the task's effective batch through accumulation_steps; off CUDA it needs
``--set memory_budget=2GiB`` (see :mod:`.batchsize`). ``--resume`` reuses the recorded choice.

Every option is checked before any data is rendered or loaded: a bad value, an unknown key or
invalid YAML exits with code 2 and one line, ``advtrain: error: ...``, naming the option. A config
file may hold at most 64 KiB, and a config file or a ``--set`` value at most 10,000 values and
100,000 characters of strings once YAML aliases are expanded, nested at most 32 deep (a few
hundred bytes of aliases can otherwise expand to millions of values, and the options are copied
into every checkpoint).

``advtrain report`` also reads a run of the Python API: pass the ``checkpoint_dir`` (or its
parent); it finds ``NAME_metrics.jsonl`` (``--model-name`` picks one of several) and writes
``NAME_report.png`` and ``NAME_diagnosis.txt`` next to it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from ..engine.config import AMBIGUOUS, TrainConfig
from ..engine.presets import PRESET_ALIASES, PRESETS, get_preset

__all__ = ["main", "build_parser", "layer_options", "resolve_options", "train_run",
           "write_report"]

log = logging.getLogger("advanced_training_utils.app.cli")

# Options the CLI sets itself from the run directory; not settable by --set or a config file.
_RESERVED = {"checkpoint_dir", "model_name", "metrics_file", "resume", "optimizer", "augment",
             "on_epoch_end", "batch_size_choice"}  # batch_size_choice: --set batch_size=auto

#: The seed when neither --seed, --set seed= nor the config file gives one.
DEFAULT_SEED = 0

#: Bounds on a config file / one --set value (see the module docstring).
MAX_CONFIG_BYTES = 64 * 1024
MAX_CONFIG_VALUES = 10_000
MAX_CONFIG_CHARS = 100_000
MAX_CONFIG_DEPTH = 32


class CLIError(Exception):
    """A user error: printed as one line, exit code 2."""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Appends ``(default: X)`` to an option's help and keeps the epilog's line breaks. A default
    of None, False (a flag) or ``[]`` is not shown: the option's help says what applies then."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or action.default == []:
            return action.help or ""
        return super()._get_help_string(action) or ""


_EPILOG = """\
Examples:
  advtrain train --task emotion --preset stable --out runs/emotion
  advtrain train --data corpus/labels.csv --target emotion --group-column speaker --out runs/mine
  advtrain report runs/emotion
  advtrain presets

Run 'advtrain COMMAND --help' for the options of each command and their defaults."""

_TRAIN_EPILOG = """\
Examples:
  advtrain train --task emotion --preset stable --out runs/emotion
  advtrain train --task notes --epochs 5 --set learning_rate=1e-3 --set batch_size=128 \\
                 --out runs/notes
  advtrain train --task emotion --config my.yaml --out runs/emotion --resume
  advtrain train --data corpus/labels.csv --target emotion --split-column split \\
                 --group-column speaker --out runs/mine
  advtrain train --data corpus/labels.csv --target valence,arousal --out runs/va
  advtrain train --data wavs/ --out runs/folder     # wavs/<class>/*.wav

Options layer, later wins: the task's defaults, the preset, --config, --set, then --epochs,
--seed and --device."""

_REPORT_EPILOG = """\
Examples:
  advtrain report runs/emotion                   # a run directory of advtrain train
  advtrain report ckpts --model-name classifier  # a checkpoint_dir of train_model_advanced"""

_PRESETS_EPILOG = """\
Example:
  advtrain presets
  advtrain train --preset fast --out runs/fast   # then train with one of them"""


#: ``advtrain train``'s CSV options (all default to None) and their help.
_CSV_FLAGS = (
    ("--target", "CSV label column; several numeric ones (valence,arousal) give regression "
                 "(default: none; required with a CSV)"),
    ("--split-column", "CSV column of train/val/test (any subset); val is carved from train by "
                       "group when missing (default: none: a grouped 80/10/10 split)"),
    ("--group-column", "CSV column kept within one split, e.g. speaker (default: none: each "
                       "file alone)"),
    ("--path-column", "CSV column of the audio paths (default: path)"),
)


def add_source_arguments(p: argparse.ArgumentParser, task_help: str) -> None:
    """``--task`` and the ``--data`` group (the audio and its CSV options, :data:`_CSV_FLAGS`):
    what a command trains on, as ``advtrain train``, ``lr-find`` and ``tune`` read it
    (:func:`task_name`, :func:`audio_plan`)."""
    from .tasks import TASKS

    p.add_argument("--task", choices=TASKS, default=None, help=task_help)
    d = p.add_argument_group("your own audio (instead of --task)")
    d.add_argument("--data", type=Path, default=None,
                   help="a labels .csv (paths relative to its folder) or a folder with one "
                   "subfolder per class (default: none: --task)")
    for flag, text in _CSV_FLAGS:
        d.add_argument(flag, default=None, help=text)


def build_parser() -> argparse.ArgumentParser:
    """The ``advtrain`` parser: ``--version``, and the ``train``, ``report`` and ``presets``
    commands, each with its defaults and an example in ``--help``."""
    from .._version import package_version
    from .tasks import TASK_TRAIN_DEFAULTS

    p = argparse.ArgumentParser(prog="advtrain", description="Train and inspect the built-in "
                                "audio-emotion and emotion-to-notes tasks.",
                                epilog=_EPILOG, formatter_class=_HelpFormatter)
    p.add_argument("--version", action="version", version=f"advtrain {package_version()}")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a built-in task or your audio into a run directory",
                       description="Train a built-in task (--task) or your own audio (--data) "
                       "into a run directory:\ncheckpoints/, metrics.jsonl, summary.json, "
                       "report.png, diagnosis.txt.",
                       epilog=_TRAIN_EPILOG, formatter_class=_HelpFormatter)
    add_source_arguments(t, "the built-in task; not with --data (default: emotion: clips in "
                         "their own keys, several timbres; emotion-easy: all in C, one timbre; "
                         "--set train_fraction=0.1 trains on 10%% of the training melodies)")
    t.add_argument("--preset", default="stable",
                   help="one of: " + ", ".join([*PRESETS, *PRESET_ALIASES])
                   + " (see advtrain presets)")
    from .usertask import AUDIO_TRAIN_DEFAULTS

    epochs = ", ".join([*(f"{k} {v['epochs']}" for k, v in TASK_TRAIN_DEFAULTS.items()),
                        f"--data {AUDIO_TRAIN_DEFAULTS['epochs']}"])
    t.add_argument("--epochs", type=int, default=None,
                   help=f"epochs to train (default: from --set/--config, else the task's: {epochs})")
    t.add_argument("--out", type=_out_dir, default=Path("runs/latest"), help="the run directory")
    t.add_argument("--resume", action="store_true", help="continue the run in --out")
    t.add_argument("--seed", type=int, default=None,
                   help=f"wins over seed in --set/--config (default: {DEFAULT_SEED})")
    t.add_argument("--device", default=None,
                   help="auto, cpu, cuda, cuda:N, mps (where available); wins over device in "
                   "--set/--config (default: auto)")
    t.add_argument("--config", type=Path, default=None,
                   help="YAML file of options (default: none)")
    t.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override one option (repeatable); VALUE is parsed as YAML "
                   "(default: none)")
    t.add_argument("--quiet", action="store_true",
                   help="no progress bar (default: a bar on a terminal, else a line per epoch)")
    t.add_argument("--nproc-per-node", type=int, default=1, metavar="N",
                   help="launch N processes on this machine through torch.distributed.run (DDP)")
    r = sub.add_parser("report", help="write report.png and the diagnosis for a run directory",
                       description="Write report.png and diagnosis.txt for a run directory.",
                       epilog=_REPORT_EPILOG, formatter_class=_HelpFormatter)
    r.add_argument("run_dir", type=Path,
                   help="a run directory of advtrain train, or a checkpoint_dir of the Python API")
    r.add_argument("--model-name", default=None,
                   help="which NAME_metrics.jsonl to read when the directory holds several "
                   "(default: the only one)")
    from . import compare, lrfind

    lrfind.add_parser(sub)
    compare.add_parser(sub)
    sub.add_parser("presets", help="list the presets and their options",
                   description="List the presets and their options.",
                   epilog=_PRESETS_EPILOG, formatter_class=_HelpFormatter)
    from . import tune

    tune.add_parser(sub)
    return p


def task_name(args: argparse.Namespace) -> str:
    """The task of a ``train`` command: ``"audio"`` with ``--data``, else ``--task`` (emotion)."""
    from .usertask import AUDIO_TASK

    if getattr(args, "data", None) is not None:
        return AUDIO_TASK
    return args.task or "emotion"


def _task_options(task: str) -> dict[str, Any]:
    """The task's own options with their defaults."""
    from .tasks import TASK_OPTIONS
    from .usertask import AUDIO_OPTIONS, AUDIO_TASK

    return AUDIO_OPTIONS if task == AUDIO_TASK else TASK_OPTIONS[task]


def _valid_keys(task: str) -> list[str]:
    train = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in _RESERVED]
    return sorted(set(train) | set(_task_options(task)))


def audio_plan(args: argparse.Namespace) -> Any:
    """The :class:`~.usertask.AudioPlan` of ``--data`` (its listing read, no audio decoded),
    or None without ``--data``.

    Raises:
        CLIError: ``--data`` with ``--task``, a CSV option without ``--data``, or what
            :func:`~.usertask.plan_audio` refuses (missing file, unknown column...).
    """
    from .usertask import DataSpec, plan_audio

    csv_opts = {"--target": args.target, "--split-column": args.split_column,
                "--group-column": args.group_column, "--path-column": args.path_column}
    if args.data is None:
        given = [k for k, v in csv_opts.items() if v is not None]
        if given:
            raise CLIError(f"{', '.join(given)} apply to --data only (a labels CSV)")
        return None
    if args.task is not None:
        raise CLIError(f"--data and --task are mutually exclusive: --data trains on your audio "
                       f"({args.data}), --task on a built-in task ({args.task})")
    spec = DataSpec(args.data, args.target, args.path_column or "path", args.split_column,
                    args.group_column)
    try:
        return plan_audio(spec)
    except (OSError, ValueError) as e:
        raise CLIError(str(e)) from None


def _check_keys(where: str, options: dict[str, Any], task: str) -> None:
    valid = _valid_keys(task)
    bad = sorted(k for k in options if k not in valid)
    ambiguous = [AMBIGUOUS[k] for k in bad if k in AMBIGUOUS]
    if ambiguous:
        raise CLIError(f"{where}: " + "; ".join(ambiguous))
    fixed = [k for k in bad if k in _RESERVED]
    if fixed:
        raise CLIError(f"{where}: {', '.join(fixed)} cannot be set here: the command sets "
                       f"{'it' if len(fixed) == 1 else 'them'} itself (the run directory --out "
                       "holds the checkpoints and the metrics log; --resume resumes; "
                       "batch_size=auto records its choice; optimizer, augment and on_epoch_end "
                       "are Python objects: use train_model_advanced)")
    if bad:
        raise CLIError(f"{where}: unknown option(s) {', '.join(bad)}; valid options: "
                       + ", ".join(valid))


class _YAMLLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads ``1e-3`` as a float (YAML 1.2; 1.1 wants ``1.0e-3``)."""


_YAMLLoader.yaml_implicit_resolvers = {
    k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_YAMLLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def _count_values(obj: Any, where: str) -> None:
    """Refuse ``obj`` if, once aliases are expanded (a shared or self-referencing node counts
    once per reference), it holds more than MAX_CONFIG_VALUES values or MAX_CONFIG_CHARS
    characters of strings, or nests deeper than MAX_CONFIG_DEPTH."""
    stack, count, chars = [(obj, 1)], 0, 0
    while stack:
        node, depth = stack.pop()
        count += 1
        chars += len(node) if isinstance(node, (str, bytes)) else 0
        if count > MAX_CONFIG_VALUES or chars > MAX_CONFIG_CHARS:
            what = (f"{MAX_CONFIG_VALUES} values" if count > MAX_CONFIG_VALUES
                    else f"{MAX_CONFIG_CHARS} characters")
            raise CLIError(f"{where}: more than {what} once YAML aliases are expanded; refused "
                           "(see advtrain --help)")
        if depth > MAX_CONFIG_DEPTH:
            raise CLIError(f"{where}: nested more than {MAX_CONFIG_DEPTH} deep; refused")
        if isinstance(node, dict):
            stack.extend((x, depth + 1) for kv in node.items() for x in kv)
        elif isinstance(node, (list, tuple)):
            stack.extend((x, depth + 1) for x in node)


def _load_yaml(text: str, where: str) -> Any:
    """Parse YAML text within the bounds; errors become one-line :class:`CLIError`."""
    try:
        obj = yaml.load(text, Loader=_YAMLLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        raise CLIError(f"{where}: not valid YAML ({at}{getattr(e, 'problem', None) or e})"
                       ) from None
    except RecursionError:
        raise CLIError(f"{where}: nested more than {MAX_CONFIG_DEPTH} deep; refused") from None
    _count_values(obj, where)
    return obj


def _parse_sets(sets: list[str]) -> dict[str, Any]:
    out = {}
    for item in sets:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise CLIError(f"--set expects KEY=VALUE, got {item!r}")
        out[key.strip()] = _load_yaml(value, f"--set {key.strip()}") if value.strip() else None
    return out


def _read_config(path: Path) -> dict[str, Any]:
    """The options of a YAML config file (a mapping), within the size bounds."""
    if not path.is_file():
        raise CLIError(f"--config: no such file {path}")
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise CLIError(f"--config {path}: {size} bytes; a config file may hold at most "
                           f"{MAX_CONFIG_BYTES}")
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CLIError(f"--config {path}: cannot read it ({e})") from None
    loaded = _load_yaml(text, f"--config {path}")
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise CLIError(f"--config {path}: expected a mapping of options, got "
                       f"{type(loaded).__name__}")
    return loaded


def _check_task_options(task: str, options: dict[str, Any]) -> None:
    """The task's own options (``batch_size``, ``per_piece``...), checked before any data."""
    from .._validate import check_int, check_real
    from .usertask import AUDIO_TASK, check_audio_options

    try:
        if task == AUDIO_TASK:
            check_audio_options(options)
        if "batch_size" in options and options["batch_size"] != "auto":
            check_int("batch_size", options["batch_size"], low=1)
        if options.get("per_piece") is not None:
            check_int("per_piece", options["per_piece"], low=1)
        if "train_fraction" in options:
            check_real("train_fraction", options["train_fraction"], low=0.0, high=1.0,
                       low_inclusive=False)
    except (TypeError, ValueError) as e:
        raise CLIError(f"{e} (task {task!r})") from None


def resolve_options(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """Layer the options; return (train options, task options), all checked.

    Raises:
        CLIError: an unknown preset or key, invalid or oversized YAML, or a bad value (the
            whole :class:`TrainConfig` and the task's options are validated here).
    """
    plan = audio_plan(args)
    layers = []
    if args.config is not None:
        layers.append((f"--config {args.config}", _read_config(args.config)))
    layers.append(("--set", _parse_sets(args.sets)))
    return layer_options(task_name(args), plan, args.preset, layers, epochs=args.epochs,
                         device=args.device, seed=args.seed, quiet=args.quiet,
                         nproc_per_node=getattr(args, "nproc_per_node", 1))


def layer_options(task: str, plan: Any, preset: str, layers: list[tuple[str, dict[str, Any]]],
                  *, epochs: int | None = None, device: str | None = None,
                  seed: int | None = None, quiet: bool = False, nproc_per_node: int = 1
                  ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The options of one run, later wins: the task's defaults, ``preset``, each of ``layers``
    (``(where, options)``: ``where`` names the source in error messages), then ``epochs``,
    ``device`` and ``seed`` when given (``nproc_per_node``: the processes that will train it,
    for ``batch_size='auto'``). ``plan`` is the :class:`~.usertask.AudioPlan` of
    ``--data`` (None for a built-in task). Returns (train options, task options), all checked.

    Raises:
        CLIError: an unknown preset or key, or a bad value.
    """
    from .tasks import TASK_TRAIN_DEFAULTS
    from .usertask import AUDIO_TASK, train_defaults

    if preset not in PRESETS and preset not in PRESET_ALIASES:
        raise CLIError(f"unknown preset {preset!r}; valid presets: "
                       + ", ".join([*PRESETS, *PRESET_ALIASES]))
    defaults = train_defaults(plan) if task == AUDIO_TASK else TASK_TRAIN_DEFAULTS[task]
    merged: dict[str, Any] = {**defaults, **get_preset(preset)}
    for where, options in layers:
        _check_keys(where, options, task)
        merged.update(options)
    if epochs is not None:
        merged["epochs"] = epochs
    if device is not None:
        merged["device"] = device
    if seed is not None:
        merged["seed"] = seed
    if merged.get("seed") is None:
        merged["seed"] = DEFAULT_SEED
    task_opts = {k: merged.pop(k) for k in list(merged) if k in _task_options(task)
                 and k not in {f.name for f in dataclasses.fields(TrainConfig)}}
    _check_task_options(task, task_opts)
    merged["verbose"] = not quiet and merged.get("verbose", True)
    try:
        TrainConfig.from_options(**merged)
    except (TypeError, ValueError) as e:
        raise CLIError(str(e)) from None
    _check_class_weights(task, plan, merged)
    _check_batch_options(task, task_opts, merged, nproc_per_node)
    return merged, task_opts


def _check_batch_options(task: str, task_opts: dict[str, Any], options: dict[str, Any],
                         nproc_per_node: int) -> None:
    """``batch_size='auto'`` and ``memory_budget`` (:mod:`.batchsize`), before any work."""
    from .batchsize import check_batch_options

    try:
        check_batch_options(task_opts, options.get("device", "auto"),
                            nproc_per_node)  # lr-find, tune, compare: one process
    except (TypeError, ValueError) as e:
        raise CLIError(f"{e} (task {task!r})") from None


def _check_class_weights(task: str, plan: Any, options: dict[str, Any]) -> None:
    """``class_weights`` weights a class-index loss and ``label_smoothing`` smooths class
    labels: refuse them up front for a task whose loss is not one (notes: BCE over note
    probabilities; --data regression: MSE)."""
    regression = plan is not None and getattr(plan, "kind", None) == "regression"
    if task != "notes" and not regression:
        return
    what = "--data regression (MSE)" if regression else "--task notes (BCE)"
    for key, verb in (("class_weights", "weight"), ("label_smoothing", "smooth")):
        if options.get(key):
            raise CLIError(f"{key}={options[key]!r} needs a classification task (cross-entropy "
                           f"over class labels); {what} has no classes to {verb}")


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


def _build(args: argparse.Namespace, name: str, seed: int, task_opts: dict[str, Any]) -> Any:
    """The :class:`~.tasks.Task` of the command: a built-in one, or one over ``--data``."""
    return _build_task(audio_plan(args), name, seed, task_opts)


def _build_task(plan: Any, name: str, seed: int, task_opts: dict[str, Any]) -> Any:
    """Task ``name``, over ``plan`` (the :class:`~.usertask.AudioPlan`) for ``--data``.
    A data error found while reading the audio (every training file unusable, a split left
    empty...) is a :class:`CLIError`."""
    from .tasks import build_task
    from .usertask import AUDIO_TASK, build_audio_task

    if name != AUDIO_TASK:
        return build_task(name, seed, task_opts)
    try:
        return build_audio_task(plan, seed, task_opts)
    except (OSError, ValueError) as e:
        raise CLIError(str(e)) from None


def build_run_task(plan: Any, name: str, options: dict[str, Any], task_opts: dict[str, Any],
                   checkpoint_dir: Path, resume: bool) -> tuple[Any, dict[str, Any]]:
    """The task of a run (``advtrain train``, ``lr-find``, a tune trial) and its training
    options, with ``batch_size='auto'`` resolved (:func:`.batchsize.apply_auto`: the loaders
    rebatched, ``accumulation_steps`` and ``batch_size_choice`` set; on resume the recorded
    choice)."""
    import torch

    from .batchsize import apply_auto, build_options

    default_batch = _task_options(name)["batch_size"]
    task = _build_task(plan, name, options["seed"], build_options(task_opts, default_batch))
    try:
        return task, apply_auto(task, options, task_opts, default_batch, checkpoint_dir, name,
                                resume)
    except (ValueError, torch.OutOfMemoryError) as e:  # nothing fits; another target on resume
        raise CLIError(str(e)) from None


def _check_out(out: Path, name: str, resume: bool) -> None:
    """Refuse a run directory that cannot hold this run: a file, or another task's run (its
    summary, report and metrics log would be replaced, and ``--resume`` would train the other
    task from scratch over them)."""
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} exists and is not a directory")
    summary = out / "summary.json"
    try:
        other = json.loads(summary.read_text()).get("task") if summary.is_file() else None
    except (OSError, ValueError, AttributeError):
        other = None
    if other is None:
        runs = sorted(p.name[:-len("_last.pt")] for p in (out / "checkpoints").glob("*_last.pt"))
        other = runs[0] if runs and name not in runs else None
    if other is not None and other != name:
        raise CLIError(f"--out {out} holds a run of task {other!r}, not {name!r}; choose another "
                       "--out (or the same task to continue it with --resume)")
    if resume and not (out / "checkpoints" / f"{name}_last.pt").exists():
        log.warning("--resume: %s holds no checkpoint of %r; starting a fresh run", out, name)
    elif not resume and (out / "checkpoints" / f"{name}_last.pt").exists():
        log.info("%s already holds a run; starting over (pass --resume to continue it); the "
                 "earlier run's files are kept under time-stamped names", out)


def _out_dir(text: str) -> Path:
    """``--out``: a folder name (an empty string would put the run in the current folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must name a folder, got an empty string")
    return Path(text)


def _train(args: argparse.Namespace, argv: list[str]) -> int:
    from ..engine.distributed import env_world_size

    if args.nproc_per_node < 1:
        raise CLIError(f"--nproc-per-node must be >= 1, got {args.nproc_per_node}")
    if args.nproc_per_node > 1 and env_world_size() == 1:
        resolve_options(args)  # report option errors before launching anything
        return _launch(args, argv)
    options, task_opts = resolve_options(args)
    summary, text = train_run(args.out, task_name(args), options, task_opts,
                              plan=audio_plan(args), preset=args.preset,
                              resume=bool(args.resume))
    if summary is None:
        return 0  # rank 0 evaluates and writes the summary and report
    print(_headline(summary))
    print(text)
    return 0


def train_run(out: Path, name: str, options: dict[str, Any], task_opts: dict[str, Any], *,
              plan: Any = None, preset: str, resume: bool, report: bool = True
              ) -> tuple[dict[str, Any] | None, str]:
    """One run directory, as ``advtrain train`` writes it: build task ``name`` (over ``plan``,
    the :class:`~.usertask.AudioPlan`, for ``--data``), train it with ``options`` (checked, as
    :func:`layer_options` returns them) into ``out``, evaluate, write ``summary.json`` (last,
    atomically: a run directory whose summary.json is readable is finished) and, with
    ``report``, the report (``advtrain report`` writes it later otherwise).

    Returns:
        (the summary, the diagnosis text or ""); (None, "") on a rank other than 0 under DDP.

    Raises:
        CLIError: ``out`` holds another task's run, or a data error.
    """

    from ..engine.distributed import env_world_size
    from ..engine.run import resolve_device, train_model_advanced
    from ..safeio import atomic_write
    from .report.samples import save_train_samples

    ckpt_dir = out / "checkpoints"
    _check_out(out, name, resume)
    t0 = time.perf_counter()
    task, options = build_run_task(plan, name, options, task_opts, ckpt_dir, resume)
    data_seconds = time.perf_counter() - t0
    log.info("task %s: %s (data ready in %.1fs)", name, _brief(task.info), data_seconds)
    out.mkdir(parents=True, exist_ok=True)
    res = train_model_advanced(
        task.model, task.train_loader, task.val_loader, task.criterion,
        checkpoint_dir=ckpt_dir, model_name=name, metrics_file=out / "metrics.jsonl",
        resume=resume, **options)
    if int(os.environ.get("RANK", "0")) != 0:
        return None, ""
    device = resolve_device(options.get("device", "auto"))
    if options.get("augment") == "audio":  # spectrogram inputs: a few for the report
        save_train_samples(task.train_loader, out)
    summary = {"task": name, "preset": preset, **_run_summary(res, options, device),
               **task.evaluate_test(task.model, device, out),
               "world_size": env_world_size(), "data": task.info,
               "data_seconds": round(data_seconds, 2),
               "wall_seconds": round(time.perf_counter() - t0, 2),
               "options": TrainConfig.from_options(**options).to_plain(),
               "task_options": task_opts}
    text = json.dumps(summary, indent=2, default=str) + "\n"
    atomic_write(out / "summary.json", lambda f: f.write(text.encode()))
    return summary, write_report(out) if report else ""


def _brief(info: dict[str, Any]) -> dict[str, Any]:
    """The task info for the log line (a user corpus' full account is in summary.json)."""
    keep = ("layout", "task", "class_names", "split_sizes", "crop_seconds", "normalization",
            "n_skipped", "input_shape", "train_examples", "val_examples", "test_examples")
    return {k: v for k, v in info.items() if k in keep}


def _run_summary(res: dict[str, Any], options: dict[str, Any], device: Any) -> dict[str, Any]:
    import torch

    accs = [h["val_accuracy"] for h in res["history"] if h.get("val_accuracy") is not None]
    return {"seed": options["seed"], "device": str(device), "torch": torch.__version__,
            "epochs_run": res["epochs_run"], "best_epoch": res["best_epoch"],
            "best_val_loss": res["best_val_loss"], "stopped_early": res["stopped_early"],
            "skipped_steps": res["skipped_steps"],
            "best_val_accuracy": max(accs) if accs else None,
            "class_weights": res.get("class_weights")}


def _fmt(v: Any, spec: str = ".3f") -> str:
    return "n/a" if v is None else format(v, spec)


def _headline(s: dict[str, Any]) -> str:
    if s["task"] in ("emotion", "emotion-easy"):
        return (f"{s['task']}: held-out test accuracy {s['test_accuracy']:.3f} on "
                f"{s['test_examples']} clips (majority class {s['majority_baseline_accuracy']:.3f}); "
                f"best epoch {s['best_epoch']}/{s['epochs_run']}; {s['wall_seconds']:.0f}s")
    if s["task"] == "notes":
        p = s["scale_degree_probe"]
        return (f"notes: held-out BCE {s['test_bce']:.4f} vs predict-the-mean "
                f"{s['mean_baseline_bce']:.4f}; P(E4) major {p['major']['E4']:.3f} / minor "
                f"{p['minor']['E4']:.3f}, P(Eb4) major {p['major']['Eb4']:.3f} / minor "
                f"{p['minor']['Eb4']:.3f}")
    t, skipped = s.get("test"), s["data"].get("n_skipped", 0)
    tail = (f"best epoch {s['best_epoch']}/{s['epochs_run']}; {skipped} file(s) skipped; "
            f"{s['wall_seconds']:.0f}s")
    if t is None:
        return f"{s['task']}: no test split; {tail}"
    what = (f"UAR {_fmt(t['uar'])}, macro-F1 {_fmt(t['macro_f1'])}, accuracy "
            f"{_fmt(t['accuracy'])}" if "uar" in t else
            f"CCC {_fmt(t['ccc'])}, MAE {_fmt(t['mae'], '.4f')}")
    return f"{s['task']}: held-out test {what} on {s['test_examples']} clips; {tail}"


def _find_metrics(run_dir: Path, model_name: str | None) -> tuple[Path, str | None]:
    """The metrics log in ``run_dir``: ``(path, model name)``; the name is None for the
    ``metrics.jsonl`` of ``advtrain train``, else the NAME of an API run's NAME_metrics.jsonl
    (looked for in ``run_dir`` and ``run_dir/checkpoints``)."""
    if model_name is None and (run_dir / "metrics.jsonl").is_file():
        return run_dir / "metrics.jsonl", None
    found: dict[str, Path] = {}
    for d in (run_dir, run_dir / "checkpoints"):
        for path in sorted(d.glob("*_metrics.jsonl")) if d.is_dir() else []:
            found.setdefault(path.name[: -len("_metrics.jsonl")], path)
    names = ", ".join(found)
    if model_name is not None:
        if model_name not in found:
            raise CLIError(f"--model-name {model_name!r}: no {model_name}_metrics.jsonl in "
                           f"{run_dir}" + (f"; it holds: {names}" if found else ""))
        return found[model_name], model_name
    if not found:
        raise CLIError(f"{run_dir} has no metrics.jsonl nor NAME_metrics.jsonl: is it a run "
                       "directory of advtrain train or a checkpoint_dir of train_model_advanced?")
    if len(found) > 1:
        raise CLIError(f"{run_dir} holds the metrics of several models ({names}); pass "
                       "--model-name NAME")
    ((name, path),) = found.items()
    return path, name


def _config_from_checkpoint(where: Path, model_name: str | None) -> dict[str, Any] | None:
    """The options saved in the run's newest readable checkpoint, or None."""
    from .. import checkpoint as ck

    for d in (where, where / "checkpoints"):
        stems = [model_name] if model_name else [p.name[:-len("_last.pt")]
                                                 for p in sorted(d.glob("*_last.pt"))]
        for stem in stems:
            for path in (d / f"{stem}_last.pt", d / f"{stem}_best.pt"):
                if path.is_file():
                    try:
                        return dict(ck.load_checkpoint(path)[ck.CONFIG_KEY])
                    except (ck.CheckpointError, KeyError, TypeError) as e:
                        log.warning("report: cannot read the options from %s (%s)", path, e)
    return None


def _read_history(metrics: Path) -> list[dict[str, Any]]:
    """The epochs of a metrics log; a last line cut short by a crash is skipped with a warning."""
    lines = [line for line in metrics.read_text().splitlines() if line.strip()]
    history = []
    for i, line in enumerate(lines, 1):
        try:
            history.append(json.loads(line))
        except ValueError:
            if i < len(lines):
                raise CLIError(f"{metrics}: line {i} is not JSON") from None
            log.warning("%s: skipping its last line, cut short (the run was interrupted?)",
                        metrics)
    if not history:
        raise CLIError(f"{metrics} is empty: no epoch finished yet")
    return history


def _write_report(run_dir: Path, model_name: str | None = None) -> tuple[str, Path]:
    """Write the report of the run in ``run_dir``; return (diagnosis text, PNG path)."""
    from .report import diagnose, format_diagnosis, load_run_details, plot_history

    metrics, name = _find_metrics(run_dir, model_name)
    history = _read_history(metrics)
    where = metrics.parent
    summary = where / "summary.json" if name is None else None
    try:
        s = json.loads(summary.read_text()) if summary is not None and summary.is_file() else None
    except (OSError, ValueError) as e:
        raise CLIError(f"{summary}: unreadable ({e})") from None
    config = s["options"] if s else _config_from_checkpoint(where, name)
    text = format_diagnosis(diagnose(history, config, stopped_early=(s or {}).get(
        "stopped_early")), history)
    prefix = "" if name is None else f"{name}_"
    (where / f"{prefix}diagnosis.txt").write_text(text + "\n")
    title = name or where.name
    if s is not None:
        title = f"{s.get('task')} / {s.get('preset')}: " + _test_title(s)
    details = load_run_details(where, s, config, history)
    png = plot_history(history, where / f"{prefix}report.png", title=title, diagnosis=text,
                       details=details)
    return text, png


def _test_title(s: dict[str, Any]) -> str:
    """The held-out result for the report's title."""
    if "test_accuracy" in s:
        return f"test accuracy {s['test_accuracy']:.3f}"
    if "test_bce" in s:
        return f"test BCE {s['test_bce']:.4f}"
    t = s.get("test")
    if not isinstance(t, dict):
        return "no test split"
    if "uar" in t:
        return f"test UAR {_fmt(t['uar'])}, macro-F1 {_fmt(t['macro_f1'])}"
    return f"test CCC {_fmt(t.get('ccc'))}, MAE {_fmt(t.get('mae'), '.4f')}"


def write_report(run_dir: Path, model_name: str | None = None) -> str:
    """Write the report and diagnosis of a run; return the diagnosis text.

    ``run_dir`` is a run directory of ``advtrain train`` (``report.png``, ``diagnosis.txt``)
    or the ``checkpoint_dir`` of a Python API run, or its parent (``NAME_report.png``,
    ``NAME_diagnosis.txt`` next to ``NAME_metrics.jsonl``; ``model_name`` picks NAME when there
    are several). The remedies follow the run's options (``summary.json`` or the checkpoint).
    """
    return _write_report(run_dir, model_name)[0]


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
        if args.command == "compare":
            from . import compare

            return compare.main(args)
        if args.command == "tune":
            from . import tune

            return tune.main(args)
        if args.command == "lr-find":
            from . import lrfind

            return lrfind.main(args)
        if args.command == "report":
            if not args.run_dir.is_dir():
                raise CLIError(f"no such run directory: {args.run_dir}")
            text, png = _write_report(args.run_dir, args.model_name)
            print(text)
            print(f"wrote {png}")
            return 0
        return _presets()
    except CLIError as e:
        print("advtrain: error: " + " ".join(str(e).split()), file=sys.stderr)  # one line
        return 2

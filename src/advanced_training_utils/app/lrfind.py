"""``advtrain lr-find``: the LR range test on a built-in task or your audio, with its plot.

    advtrain lr-find (--task emotion|emotion-easy|notes | --data PATH [CSV options]) --out DIR
                     [--preset P] [--config FILE.yaml] [--set key=value ...] [--seed S]
                     [--device D] [--repeats R] [--num-steps N] [--min-lr A] [--max-lr B]

The task, data and options are built as ``advtrain train`` builds them (same layering: the
task's defaults, the preset, ``--config``, ``--set``, then the flags), so the sweep uses the
optimizer, precision, clipping, accumulation and augmentation the training run would use. It
runs :func:`~advanced_training_utils.engine.lrfind.find_lr` and writes:

* ``DIR/lr_find.json``: ``suggestion``, ``spread`` ([min, max] over the sweeps),
  ``spread_ratio``, ``suggestions`` (one per sweep), ``stopped``, ``lrs``, ``losses`` and
  ``smoothed`` (per sweep), ``settings``, plus ``task``, ``preset`` and ``options``;
* ``DIR/lr_find.png``: each sweep's raw and smoothed loss against the LR (log scale), each
  sweep's suggestion (thin lines), the median (bold) and the spread (shaded).

Train with the suggestion: ``advtrain train ... --set learning_rate=<suggestion>``. Every
option is checked before any data is built (exit 2, one line). :func:`plot_lr_find` draws the
figure for a result of the Python function too.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..engine.lrfind import LRFindResult, LRFindSettings, find_lr
from ..safeio import atomic_write
from .cli import (
    CLIError,
    _HelpFormatter,
    _out_dir,
    add_source_arguments,
    audio_plan,
    build_run_task,
    resolve_options,
    task_name,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["add_parser", "main", "plot_lr_find", "build_lr_find_figure"]

_EPILOG = """\
Examples:
  advtrain lr-find --task emotion --out runs/lr
  advtrain lr-find --task emotion --preset fast --repeats 5 --num-steps 200 --out runs/lr
  advtrain lr-find --data corpus/labels.csv --target emotion --out runs/lr_mine
  advtrain train --task emotion --set learning_rate=3e-3 --out runs/emotion   # then train

Options layer as for advtrain train: the task's defaults, the preset, --config, --set, then
--seed and --device."""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``lr-find`` on ``advtrain``'s subparsers; return its parser."""
    from ..engine.presets import PRESET_ALIASES, PRESETS

    d = LRFindSettings()
    p = subparsers.add_parser(
        "lr-find", help="the LR range test: suggest a learning rate (lr_find.png, .json)",
        description="Sweep the learning rate up exponentially on a built-in task (--task) or "
        "your audio (--data), a few times with different data orders; write the suggested LR "
        "and its spread to DIR/lr_find.json and the curves to DIR/lr_find.png. The model, "
        "optimizer and every other state are restored after each sweep.",
        epilog=_EPILOG, formatter_class=_HelpFormatter)
    add_source_arguments(p, "the built-in task; not with --data (default: emotion)")
    p.add_argument("--out", type=_out_dir, required=True,
                   help="the folder for lr_find.png and lr_find.json (default: none: required)")
    p.add_argument("--preset", default="stable",
                   help="one of: " + ", ".join([*PRESETS, *PRESET_ALIASES]))
    p.add_argument("--config", type=Path, default=None, help="YAML file of options (default: none)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override one option (repeatable; VALUE parsed as YAML) (default: none)")
    p.add_argument("--seed", type=int, default=None,
                   help="the data of the task and sweep r's data order (seed + r) (default: 0)")
    p.add_argument("--device", default=None,
                   help="auto, cpu, cuda, cuda:N, mps; wins over device in --set/--config "
                   "(default: auto)")
    p.add_argument("--repeats", type=int, default=d.repeats, help="sweeps (>= 1)")
    p.add_argument("--num-steps", type=int, default=d.num_steps,
                   help="optimizer steps per sweep (>= 10)")
    p.add_argument("--min-lr", type=float, default=d.min_lr, help="the first LR of a sweep")
    p.add_argument("--max-lr", type=float, default=d.max_lr, help="the last LR of a sweep")
    p.set_defaults(epochs=None, quiet=True)  # read by resolve_options
    return p


def _settings(args: argparse.Namespace) -> LRFindSettings:
    try:
        return LRFindSettings(min_lr=args.min_lr, max_lr=args.max_lr, num_steps=args.num_steps,
                              repeats=args.repeats)
    except (TypeError, ValueError) as e:  # name the flag, not the Python argument
        flag = str(e).split()[0]
        raise CLIError(str(e).replace(flag, "--" + flag.replace("_", "-"), 1)) from None


def main(args: argparse.Namespace) -> int:
    """Run ``advtrain lr-find``; return the exit code (a :class:`~.cli.CLIError` for a user
    error: ``advtrain`` prints it as one line and exits with 2)."""
    settings = _settings(args)
    options, task_opts = resolve_options(args)
    out: Path = args.out
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} exists and is not a directory")
    name = task_name(args)
    task, options = build_run_task(audio_plan(args), name, options, task_opts,
                                   out / "checkpoints", resume=False)
    t0 = time.perf_counter()
    res = find_lr(task.model, task.train_loader, task.val_loader, task.criterion,
                  min_lr=settings.min_lr, max_lr=settings.max_lr, num_steps=settings.num_steps,
                  repeats=settings.repeats, **options)
    out.mkdir(parents=True, exist_ok=True)
    doc = {**res.to_dict(), "task": name, "preset": args.preset,
           "seconds": round(time.perf_counter() - t0, 2),
           "options": {k: v for k, v in options.items() if _plain(v)}}
    text = json.dumps(doc, indent=2) + "\n"
    atomic_write(out / "lr_find.json", lambda f: f.write(text.encode()))
    png = plot_lr_find(res, out / "lr_find.png", title=f"{name} / {args.preset}")
    print(_headline(res))
    print(f"wrote {out / 'lr_find.json'} and {png}")
    return 0


def _plain(v: Any) -> bool:
    return v is None or isinstance(v, (bool, int, float, str, list, dict))


def _headline(res: LRFindResult) -> str:
    if res.suggestion is None or res.spread is None:
        return "lr-find: no suggestion (no sweep fell before it rose; lower --min-lr)"
    each = ", ".join("n/a" if x is None else f"{x:.2g}" for x in res.suggestions)
    return (f"lr-find: suggested learning_rate {res.suggestion:.3g} (spread {res.spread[0]:.2g}"
            f" to {res.spread[1]:.2g} over {len(res.suggestions)} sweeps: {each})")


def build_lr_find_figure(res: LRFindResult, title: str = "") -> Figure:
    """The range test's figure: loss against LR per sweep, the suggestions marked."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.2), layout="constrained")
    ax = fig.add_subplot()
    for r, (raw, sm) in enumerate(zip(res.losses, res.smoothed)):
        color = f"C{r % 10}"
        ax.plot(res.lrs[:len(raw)], raw, color=color, alpha=0.25, lw=0.8)
        ax.plot(res.lrs[:len(sm)], sm, color=color, lw=1.6, label=f"sweep {r + 1} (smoothed)")
        if res.suggestions[r] is not None:
            ax.axvline(res.suggestions[r], color=color, ls=":", lw=1.0)
    if res.suggestion is not None and res.spread is not None:
        ax.axvspan(*res.spread, color="0.5", alpha=0.15, label="spread of the suggestions")
        ax.axvline(res.suggestion, color="k", lw=2.0,
                   label=f"suggestion {res.suggestion:.2g} (median)")
    low = min((min(sm) for sm in res.smoothed if sm), default=None)
    first = max((sm[0] for sm in res.smoothed if sm), default=None)
    if low is not None and first is not None:  # keep the diverged tail from flattening the rest
        ax.set_ylim(low - 0.1 * abs(first - low), first + 1.5 * abs(first - low) + 1e-12)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("training loss per step")
    ax.set_title(f"LR range test{': ' + title if title else ''}", fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    return fig


def plot_lr_find(res: LRFindResult, path: Path | str, title: str = "") -> Path:
    """Write :func:`build_lr_find_figure` as a PNG at ``path``; return the path."""
    path = Path(path)
    build_lr_find_figure(res, title).savefig(path, dpi=100)
    return path

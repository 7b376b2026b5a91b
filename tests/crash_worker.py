"""A small training run for the crash tests: kill it anywhere, resume it, compare weights.

    python tests/crash_worker.py OUT_DIR [--epochs 3] [--every 1] [--sleep 0] [--kill-at-io N]
                                 [--slow-write 0] [--sigterm-at N] [--mixup] [--ema] [--swa]

Trains an MLP with dropout on a shuffled synthetic dataset with seeded augmentation, plateau
scheduling and per-step checkpoints (``resume=True`` always: the first start finds nothing), and
writes the final weights to OUT_DIR/final.pt. It prints ``batch N train`` (or ``val``) at each
criterion call (flushed) so a test can kill it at a chosen point. ``--every 0``: no step
checkpoints (the default of ``train_model_advanced``). ``--kill-at-io N``: SIGKILL itself at its
Nth file operation in OUT_DIR (open for writing, write, fsync, link, rename, unlink; see
tests/faults.py), so kills land inside checkpoint writes and rotations too. ``--slow-write S``:
each write to a temporary file takes S seconds more (a signal then lands during a write).
``--sigterm-at N``: send SIGTERM to itself during the Nth criterion call, so the signal arrives
at a known step (the run must finish that step, checkpoint there and exit 143). ``--mixup``:
mixup, time-segment mixing and label smoothing on (mixup_alpha=0.4, cutmix_alpha=1.0,
label_smoothing=0.1). ``--ema``: an EMA of the weights (``ema_decay=0.9``) that validation runs
on (``eval_ema``); ``--swa``: SWA from epoch 1 and a BatchNorm layer (its statistics recomputed
for the average each epoch); with either, the averages at the end are written to
OUT_DIR/averaged.pt.
"""

import argparse
import os
import signal
import sys
import time
from pathlib import Path

import torch

from advanced_training_utils import train_model_advanced


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--every", type=int, default=1)
    ap.add_argument("--sleep", type=float, default=0.0)
    ap.add_argument("--kill-at-io", type=int, default=0)
    ap.add_argument("--slow-write", type=float, default=0.0)
    ap.add_argument("--sigterm-at", type=int, default=0)
    ap.add_argument("--mixup", action="store_true")
    ap.add_argument("--ema", action="store_true")
    ap.add_argument("--swa", action="store_true")
    args = ap.parse_args()
    if args.kill_at_io or args.slow_write:
        from faults import OPS, FileFaults

        faults = FileFaults(folder=args.out)
        if args.kill_at_io:
            faults.kill(OPS, "*", nth=args.kill_at_io)
        if args.slow_write:
            faults.on("write", "*.tmp", lambda op, path: time.sleep(args.slow_write), always=True)
        faults.install()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(240, 12, generator=g)
    y = (x[:, :3].sum(1) > 0).long()
    train = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:192], y[:192]),
                                        batch_size=8, shuffle=True)
    val = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[192:], y[192:]),
                                      batch_size=16)
    torch.manual_seed(1)
    layers = [torch.nn.Linear(12, 32), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(32, 2)]
    model = torch.nn.Sequential(*layers[:1], *[torch.nn.BatchNorm1d(32)] * args.swa, *layers[1:])
    averaging = {**({"ema_decay": 0.9, "eval_ema": True} if args.ema else {}),
                 **({"swa_start": 1} if args.swa else {})}
    ce = torch.nn.CrossEntropyLoss()
    calls = [0]

    def criterion(out, target):
        calls[0] += 1
        print(f"batch {calls[0]} {'train' if model.training else 'val'}", flush=True)
        if args.sleep:
            time.sleep(args.sleep)
        if calls[0] == args.sigterm_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return ce(out, target)

    mixup = dict(mixup_alpha=0.4, cutmix_alpha=1.0, label_smoothing=0.1) if args.mixup else {}
    r = train_model_advanced(model, train, val, criterion, epochs=args.epochs, learning_rate=3e-3,
                             device="cpu", checkpoint_dir=args.out, model_name="w", seed=0,
                             resume=True, checkpoint_every_n_steps=args.every or None,
                             verbose=False, use_augmentation=True, augment="emotion",
                             augment_options={"noise_level": 0.05}, scheduler_type="plateau",
                             plateau_patience=1, restore_best_weights=False, **averaging,
                             **mixup)
    torch.save(model.state_dict(), args.out / "final.pt")
    if averaging:
        torch.save(r["averaged_weights"], args.out / "averaged.pt")
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

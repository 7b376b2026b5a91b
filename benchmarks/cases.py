"""One benchmark measurement per process: ``python -m benchmarks.cases CASE VARIANT``.

Prints one JSON line ``{"case", "variant", "seconds", ...}``. The process pins one torch thread
and warms up before timing; ``benchmarks/run.py`` launches these fresh, interleaved, repeated.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

torch.set_num_threads(1)


# ---------------------------------------------------------------- models and data
def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64 * 32, 64), nn.ReLU(), nn.Linear(64, 4))


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 16 * 8, 4))


def _loaders(n: int = 4096, batch: int = 64, cnn: bool = False):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 64, 32, generator=g)
    if not cnn:
        x = x[:, 0]
    y = torch.randint(0, 4, (n,), generator=g)
    ds = torch.utils.data.TensorDataset(x, y)
    val = torch.utils.data.TensorDataset(x[:n // 8], y[:n // 8])  # validation scales with data
    return (torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True),
            torch.utils.data.DataLoader(val, batch_size=256))


def _hand_loop(model: nn.Module, tl, vl, epochs: int) -> None:
    """The same math written by hand: fused AdamW, clip 1.0, StepLR, validation per epoch."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)
    ce = nn.CrossEntropyLoss()
    for _ in range(epochs):
        model.train()
        for x, y in tl:
            opt.zero_grad(set_to_none=True)
            ce(model(x), y).backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        model.eval()
        with torch.no_grad():
            total = torch.zeros(())
            for x, y in vl:
                total += ce(model(x), y) * len(y)
            float(total)
        sched.step()


def _ours(model: nn.Module, tl, vl, epochs: int, ckpt: str) -> None:
    from advanced_training_utils import train_model_advanced

    devnull = open(os.devnull, "w")  # the progress bar is on, drawn to nowhere
    old, sys.stderr = sys.stderr, devnull
    try:
        train_model_advanced(model, tl, vl, nn.CrossEntropyLoss(), epochs=epochs,
                             learning_rate=1e-3, device="cpu", scheduler_type="step",
                             step_size=10, gamma=0.5, gradient_clip=1.0, check_stability=True,
                             stability_every=1, verbose=True, checkpoint_dir=ckpt,
                             restore_best_weights=False, handle_signals=False)
    finally:
        sys.stderr = old


def case_loop(variant: str, model_kind: str) -> dict[str, Any]:
    """Seconds for 3 epochs (after a 1-epoch warm-up) of the hand loop or train_model_advanced."""
    cnn = model_kind == "cnn"
    tl, vl = _loaders(cnn=cnn)
    make = _cnn if cnn else _mlp
    with tempfile.TemporaryDirectory() as d:
        run = (lambda m, e: _hand_loop(m, tl, vl, e)) if variant == "hand" else (
            lambda m, e: _ours(m, tl, vl, e, d))
        run(make(), 1)  # warm-up: imports, allocator, first optimizer construction
        torch.manual_seed(1)
        t0 = time.perf_counter()
        run(make(), 3)
        dt = time.perf_counter() - t0
    return {"seconds": dt, "steps": 3 * len(tl)}


def case_augment(variant: str) -> dict[str, Any]:
    from advanced_training_utils import DataAugmentation

    x = torch.randn(256, 128, 256)
    aug = DataAugmentation(seed=0)
    fns = {
        "clone": lambda: x.clone(),
        "ours": lambda: aug.augment_audio_features(x),
        "loop": lambda: torch.stack([aug.augment_audio_features(e) for e in x]),
    }
    fn = fns[variant]
    fn()
    times = []
    for _ in range(3 if variant == "loop" else 7):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"seconds": sorted(times)[len(times) // 2]}


def _ten_million() -> nn.Module:
    torch.manual_seed(0)
    layers = []
    for _ in range(10):
        layers += [nn.Linear(1000, 1000), nn.ReLU()]
    m = nn.Sequential(*layers)  # 10.01 M parameters in 20 tensors
    for p in m.parameters():
        p.grad = torch.randn_like(p)
    return m


def case_stability(variant: str) -> dict[str, Any]:
    from advanced_training_utils import TrainingStability

    m = _ten_million()
    fns = {
        "total_norm": lambda: float(torch.nn.utils.get_total_norm(
            [p.grad for p in m.parameters()])),
        "check_gradients": lambda: TrainingStability.check_gradients(m),
        "check_weights": lambda: TrainingStability.check_weights(m),
    }
    fn = fns[variant]
    fn()
    times = []
    for _ in range(9):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"seconds": sorted(times)[len(times) // 2]}


def case_checkpoint(variant: str) -> dict[str, Any]:
    from advanced_training_utils import load_checkpoint, save_checkpoint

    m = _ten_million()
    payload = {"model": m.state_dict(), "epoch": 3}
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as d:
        path = Path(d) / "c.pt"
        ops = {
            "torch_save": lambda: torch.save(payload, path),
            "ours_save": lambda: save_checkpoint(path, payload),
            "torch_load": lambda: torch.load(path, weights_only=True),
            "ours_load": lambda: load_checkpoint(path),
        }
        if variant.endswith("load"):
            save_checkpoint(path, payload)
        fn = ops[variant]
        fn()
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return {"seconds": sorted(times)[len(times) // 2], "bytes": 4 * 10_010_000}


class _Crash(Exception):
    pass


class _SlowItems(torch.utils.data.Dataset):
    """A dataset whose items cost 0.2 ms each to load (decoding, say)."""

    def __init__(self, base: Any) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> Any:
        time.sleep(0.0002)
        return self.base[i]


def case_resume(variant: str) -> dict[str, Any]:
    """Seconds from calling train_model_advanced(resume=True) to its first training step, after
    a crash at 10% or 90% of a 400-batch epoch."""
    from advanced_training_utils import train_model_advanced

    frac = {"at10": 0.1, "at90": 0.9}[variant]
    tl, vl = _loaders(n=400 * 16, batch=16)
    tl = torch.utils.data.DataLoader(_SlowItems(tl.dataset), batch_size=16, shuffle=True)
    n_batches = len(tl)
    at = int(frac * n_batches)
    with tempfile.TemporaryDirectory() as d:
        calls = [0]
        first: list[float] = []

        def crash(out, y):
            calls[0] += 1
            if calls[0] == at + 1:
                raise _Crash()
            return nn.functional.cross_entropy(out, y)

        opts = dict(epochs=1, device="cpu", verbose=False, checkpoint_dir=d,
                    checkpoint_every_n_steps=at, handle_signals=False, keep_last=1)
        try:
            train_model_advanced(_mlp(), tl, vl, crash, **opts)
        except _Crash:
            pass

        def timed(out, y):
            if not first:
                first.append(time.perf_counter())
                raise _Crash()
            return nn.functional.cross_entropy(out, y)

        t0 = time.perf_counter()
        try:
            train_model_advanced(_mlp(), tl, vl, timed, resume=True, **opts)
        except _Crash:
            pass
    return {"seconds": first[0] - t0, "position": at}


def case_scaling(variant: str) -> dict[str, Any]:
    """Seconds per epoch of train_model_advanced at 1x, 4x, 16x a 1024-sample dataset."""
    from advanced_training_utils import train_model_advanced

    mult = int(variant.rstrip("x"))
    tl, vl = _loaders(n=1024 * mult)
    train_model_advanced(_mlp(), tl, vl, nn.CrossEntropyLoss(), epochs=1, device="cpu",
                         verbose=False, handle_signals=False)
    t0 = time.perf_counter()
    train_model_advanced(_mlp(), tl, vl, nn.CrossEntropyLoss(), epochs=2, device="cpu",
                         verbose=False, handle_signals=False)
    return {"seconds": (time.perf_counter() - t0) / 2, "samples": 1024 * mult}


CASES = {
    "loop_mlp": lambda v: case_loop(v, "mlp"),
    "loop_cnn": lambda v: case_loop(v, "cnn"),
    "augment": case_augment,
    "stability": case_stability,
    "checkpoint": case_checkpoint,
    "resume": case_resume,
    "scaling": case_scaling,
}


if __name__ == "__main__":
    name, variant = sys.argv[1], sys.argv[2]
    out = CASES[name](variant)
    print(json.dumps({"case": name, "variant": variant, **out}))

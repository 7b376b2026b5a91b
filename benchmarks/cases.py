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


def _ours(model: nn.Module, tl, vl, epochs: int, ckpt: str, **extra: Any) -> None:
    """train_model_advanced with the hand loop's math (``extra``: options on top, e.g. EMA)."""
    from advanced_training_utils import train_model_advanced

    devnull = open(os.devnull, "w")  # the progress bar is on, drawn to nowhere
    old, sys.stderr = sys.stderr, devnull
    try:
        train_model_advanced(model, tl, vl, nn.CrossEntropyLoss(), epochs=epochs,
                             learning_rate=1e-3, device="cpu", scheduler_type="step",
                             step_size=10, gamma=0.5, gradient_clip=1.0, check_stability=True,
                             stability_every=1, verbose=True, checkpoint_dir=ckpt,
                             restore_best_weights=False, handle_signals=False, **extra)
    finally:
        sys.stderr = old


#: The loop case's variants of train_model_advanced: options on top of the hand loop's math.
LOOP_VARIANTS: dict[str, dict[str, Any]] = {
    "ours": {},
    "ema": {"ema_decay": 0.999},  # one EMA update after every optimizer step (no eval_ema)
}


def case_loop(variant: str, model_kind: str, n: int = 4096, epochs: int = 3) -> dict[str, Any]:
    """Seconds for ``epochs`` epochs (after a 1-epoch warm-up) of the hand loop or
    train_model_advanced (variant ``ours``, or ``ema``: the same with ``ema_decay=0.999``)."""
    cnn = model_kind == "cnn"
    tl, vl = _loaders(n=n, cnn=cnn)
    make = _cnn if cnn else _mlp
    with tempfile.TemporaryDirectory() as d:
        run = (lambda m, e: _hand_loop(m, tl, vl, e)) if variant == "hand" else (
            lambda m, e: _ours(m, tl, vl, e, d, **LOOP_VARIANTS[variant]))
        run(make(), 1)  # warm-up: imports, allocator, first optimizer construction
        torch.manual_seed(1)
        t0 = time.perf_counter()
        run(make(), epochs)
        dt = time.perf_counter() - t0
    return {"seconds": dt, "steps": epochs * len(tl)}


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


# ---------------------------------------------------------------- user audio (own-audio issue)
def write_corpus(folder: Path, n_clips: int = 64) -> list[Path]:
    """``n_clips`` wavs of 2-4 s at 22.05 / 44.1 kHz, mono / stereo, PCM-16 (a tone in noise)."""
    import numpy as np
    import soundfile as sf

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n_clips):
        rate, channels = (22050, 44100)[i % 2], 1 + (i // 2) % 2
        seconds = 2.0 + 2.0 * (i % 5) / 4                     # 2.0, 2.5, ..., 4.0
        rng = np.random.default_rng(i)
        t = np.arange(int(seconds * rate)) / rate
        x = 0.3 * np.sin(2 * np.pi * (150 + 40 * i) * t) + 0.05 * rng.standard_normal(len(t))
        wave = np.stack([x * (1.0 - 0.3 * c) for c in range(channels)], axis=1)
        paths.append(folder / f"clip{i:03d}.wav")
        sf.write(paths[-1], wave.astype(np.float32), rate, subtype="PCM_16")
    return paths


def case_audio_features(variant: str, n_clips: int = 64, reps: int = 5) -> dict[str, Any]:
    """Seconds to decode + resample (soxr) + log-mel ``n_clips`` files (``FeatureExtractor``,
    speech ``LogMel``, 16 kHz): ``cold`` with an empty feature cache (the entries are written),
    ``cached`` with every entry on disk (median of ``reps`` passes; a fresh extractor each)."""
    from advanced_training_utils.app.audio import FeatureCache, FeatureExtractor, LogMel

    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as d:
        paths = write_corpus(Path(d) / "wav", n_clips)
        FeatureExtractor(LogMel(), FeatureCache(enabled=False)).extract_all(paths[:2])  # warm-up
        if variant == "cached":
            FeatureExtractor(LogMel(), FeatureCache(Path(d) / "cache")).extract_all(paths)
        times = []
        for r in range(reps):
            cache = FeatureCache(Path(d) / ("cache" if variant == "cached" else f"cold{r}"))
            t0 = time.perf_counter()
            got = FeatureExtractor(LogMel(), cache).extract_all(paths, on_error="raise")
            times.append(time.perf_counter() - t0)
            if (cache.hits, cache.misses) != ((n_clips, 0) if variant == "cached" else (0, n_clips)):
                raise RuntimeError(f"{variant}: cache hits {cache.hits}, misses {cache.misses}")
        assert len(got.kept) == n_clips
    return {"seconds": sorted(times)[len(times) // 2], "clips": n_clips}


def _chorale_clips(n_train: int, n_val: int) -> dict[str, Any]:
    """The built-in emotion task's first ``n_train`` training and ``n_val`` validation clips
    (waveforms at 16 kHz, 4 s; one window per chorale)."""
    import numpy as np

    from advanced_training_utils.app.data import emotion_clips

    c = emotion_clips(seed=0, per_piece=1)
    idx = np.concatenate([np.flatnonzero(c["split"] == 0)[:n_train],
                          np.flatnonzero(c["split"] == 1)[:n_val]])
    split = np.array([0] * n_train + [1] * n_val)
    return {"wave": c["wave"][idx], "label": c["label"][idx], "split": split}


def _builtin_loaders(clips: dict[str, Any]) -> tuple[Any, Any, nn.Module]:
    """The built-in task's pipeline: log-mels in memory, ``TensorDataset`` loaders (as
    ``app/tasks.py`` builds them)."""
    from advanced_training_utils.app.data import LogMel
    from advanced_training_utils.app.models import EmotionRecognizer

    mel = LogMel.chorale()(torch.from_numpy(clips["wave"])).unsqueeze(1).float()  # [N, 1, 64, 251]
    y = torch.from_numpy(clips["label"]).long()
    s = torch.from_numpy(clips["split"])
    ds = [torch.utils.data.TensorDataset(mel[s == k], y[s == k]) for k in (0, 1)]
    torch.manual_seed(0)
    return (torch.utils.data.DataLoader(ds[0], batch_size=32, shuffle=True),
            torch.utils.data.DataLoader(ds[1], batch_size=256), EmotionRecognizer())


def _data_task_loaders(clips: dict[str, Any], folder: Path) -> tuple[Any, Any, nn.Module, float]:
    """The ``--data`` task's pipeline on the same clips written as 16 kHz wavs with a
    ``labels.csv`` (chorale features, 4 s crops: the built-in mel shape), built twice: the first
    build fills the feature cache, the second (timed, returned) reads it."""
    import soundfile as sf

    from advanced_training_utils.app.data import EMOTION_CLASSES
    from advanced_training_utils.app.usertask import DataSpec, build_audio_task, plan_audio

    rows = ["path,emotion,split"]
    for i, (w, lab, sp) in enumerate(zip(clips["wave"], clips["label"], clips["split"])):
        sf.write(folder / f"c{i:04d}.wav", w, 16000, subtype="FLOAT")
        rows.append(f"c{i:04d}.wav,{EMOTION_CLASSES[lab]},{('train', 'val')[sp]}")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    os.environ["ADVTRAIN_CACHE"] = str(folder / "cache")       # the task's default cache
    plan = plan_audio(DataSpec(folder / "labels.csv", target="emotion", split_column="split"))
    opts = {"features": "chorale", "crop_seconds": 4.0}
    build_audio_task(plan, 0, opts)                                  # cold: fills the cache
    t0 = time.perf_counter()
    task = build_audio_task(plan, 0, opts)
    build_s = time.perf_counter() - t0
    if task.info["cache"]["hits"] != len(clips["wave"]):
        raise RuntimeError(f"cache not warm: {task.info['cache']}")
    return task.train_loader, task.val_loader, task.model, build_s


def case_audio_epoch(variant: str, n_train: int = 256, n_val: int = 48,
                     epochs: int = 4) -> dict[str, Any]:
    """Median epoch seconds (``history[i]["seconds"]``, the first epoch left out as warm-up) of
    ``train_model_advanced`` with the ``stable`` preset (the demo's options) on the same clips:
    ``builtin`` through the built-in task's tensors, ``data`` through the ``--data`` task's
    datasets from a warm feature cache (per-item crops, ``EpochSampler``, padding collate)."""
    from advanced_training_utils import get_preset, train_model_advanced

    clips = _chorale_clips(n_train, n_val)
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as d:
        extra: dict[str, Any] = {}
        if variant == "builtin":
            tl, vl, model = _builtin_loaders(clips)
        else:
            tl, vl, model, extra["build_seconds"] = _data_task_loaders(clips, Path(d))
        x, _ = next(iter(tl))
        opts = get_preset("stable", learning_rate=3e-3, metrics="accuracy", augment="audio")
        res = train_model_advanced(model, tl, vl, nn.CrossEntropyLoss(), epochs=epochs,
                                   device="cpu", verbose=False, handle_signals=False,
                                   checkpoint_dir=str(Path(d) / "ckpt"), **opts)
    secs = sorted(h["seconds"] for h in res["history"][1:])
    return {"seconds": secs[len(secs) // 2], "clips": n_train, "val_clips": n_val,
            "input_shape": list(x.shape[1:]), **extra}


CASES = {
    "loop_mlp": lambda v: case_loop(v, "mlp"),
    "loop_cnn": lambda v: case_loop(v, "cnn"),
    "augment": case_augment,
    "stability": case_stability,
    "checkpoint": case_checkpoint,
    "resume": case_resume,
    "scaling": case_scaling,
    "audio_features": case_audio_features,
    "audio_epoch": case_audio_epoch,
}


if __name__ == "__main__":
    name, variant = sys.argv[1], sys.argv[2]
    out = CASES[name](variant)
    print(json.dumps({"case": name, "variant": variant, **out}))

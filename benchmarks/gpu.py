"""GPU check: fp32 vs fp16 vs bf16 through ``train_model_advanced``, and a no-sync proof.

    PYTHONPATH=src python3 benchmarks/gpu.py            # on a CUDA machine, under 5 minutes
    PYTHONPATH=src python3 benchmarks/gpu.py --smoke    # tiny sizes on the CPU (tested in CI)

For a conv model (mel input) and a transformer encoder block it trains one warm-up epoch and one
timed epoch per precision, all features on (plateau scheduler, clipping with statistics, guard,
augmentation for the conv model), and reports time per optimizer step and peak GPU memory,
as ratios to fp32 measured in the same process.

Then, per precision, a steady-state epoch runs under ``torch.cuda.set_sync_debug_mode('error')``
from its third batch to its last: any host-device synchronisation in a training step raises.
Writes ``gpu.json`` and ``gpu.md`` to ``--out`` (default: ``$OUT`` or ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from advanced_training_utils import train_model_advanced

PRECISIONS = {"fp32": dict(use_mixed_precision=False),
              "fp16": dict(use_mixed_precision=True, amp_dtype="float16"),
              "bf16": dict(use_mixed_precision=True, amp_dtype="bfloat16")}


class ConvNet(nn.Module):
    """Mel ``[B, 1, F, T]`` -> logits; four conv blocks (a wider EmotionRecognizer)."""

    def __init__(self, width: int, classes: int = 4) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = 1
        for w in (width, 2 * width, 4 * width, 4 * width):
            layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w),
                       nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            c = w
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(-2, -1)))


class TransformerNet(nn.Module):
    """Sequence ``[B, L, D]`` -> logits through ``layers`` pre-norm encoder blocks."""

    def __init__(self, d: int, heads: int, layers: int, classes: int = 4) -> None:
        super().__init__()
        block = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x).mean(dim=1))


def _batches(shape: tuple[int, ...], n: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator(device=device).manual_seed(0)
    return [(torch.randn(shape, device=device, generator=g),
             torch.randint(0, 4, (shape[0],), device=device, generator=g)) for _ in range(n)]


class SyncCheckedLoader:
    """Yields the batches; from the third batch until exhaustion, sync debug mode is 'error'."""

    def __init__(self, batches: list[Any], enabled: bool) -> None:
        self.batches, self.enabled = batches, enabled

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[Any]:
        try:
            for i, b in enumerate(self.batches):
                if self.enabled and i == 2:
                    torch.cuda.set_sync_debug_mode("error")
                yield b
        finally:
            if self.enabled:
                torch.cuda.set_sync_debug_mode("default")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(name: str, make_model: Any, shape: tuple[int, ...], steps: int, precision: str,
            device: torch.device, augment: bool, channels_last: bool = False) -> dict[str, Any]:
    """One model x precision. ``channels_last``: the model and the inputs in channels-last memory
    format, with cuDNN's benchmark mode on (the conv setup the mixed-precision claim is
    re-measured with, issue 14)."""
    torch.manual_seed(0)
    model = make_model().to(device)
    batches = _batches(shape, steps, device)
    torch.backends.cudnn.benchmark = channels_last
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        batches = [(x.contiguous(memory_format=torch.channels_last), y) for x, y in batches]
    opts = dict(epochs=3, learning_rate=1e-4, device=str(device), verbose=False,
                scheduler_type="plateau", gradient_clip=1.0, check_stability=False,
                use_augmentation=augment, augment="audio" if augment else None,
                restore_best_weights=False, **PRECISIONS[precision])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    times: list[float] = []

    class Timed(SyncCheckedLoader):
        def __iter__(self) -> Iterator[Any]:
            _sync(device)
            t0 = time.perf_counter()
            yield from super().__iter__()
            _sync(device)
            times.append(time.perf_counter() - t0)

    res = train_model_advanced(model, Timed(batches, enabled=False), None, nn.CrossEntropyLoss(),
                               **opts)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0
    # Steady-state epoch under sync-debug 'error' (a sync in a step raises RuntimeError).
    sync_ok: bool | str = "n/a (cpu)"
    if device.type == "cuda":
        try:
            opts_sync = {**opts, "epochs": 1}
            train_model_advanced(model, SyncCheckedLoader(batches, enabled=True), None,
                                 nn.CrossEntropyLoss(), **opts_sync)
            sync_ok = True
        except RuntimeError as e:
            sync_ok = f"sync detected: {str(e).splitlines()[0]}"
    return {"model": name, "precision": precision, "steps": steps,
            "step_ms": 1000 * statistics.median(times[1:]) / steps,
            "peak_mib": peak, "final_loss": res["history"][-1]["train_loss"],
            "skipped_steps": res["skipped_steps"], "no_sync_in_steps": sync_ok}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "benchmarks/results")))
    args = ap.parse_args(argv)
    if args.smoke:
        device = torch.device("cpu")
        cases = [("conv", lambda: ConvNet(4), (4, 1, 16, 32), 4, True, False),
                 ("conv+channels_last+cudnn.benchmark", lambda: ConvNet(4), (4, 1, 16, 32), 4,
                  True, True),
                 ("transformer", lambda: TransformerNet(16, 2, 1), (4, 8, 16), 4, False, False)]
        precisions = ["fp32", "bf16"]
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: run with --smoke for the CPU path", file=sys.stderr)
            return 2
        device = torch.device("cuda")
        cases = [("conv", lambda: ConvNet(64), (128, 1, 128, 256), 40, True, False),
                 ("conv+channels_last+cudnn.benchmark", lambda: ConvNet(64), (128, 1, 128, 256),
                  40, True, True),
                 ("transformer", lambda: TransformerNet(1024, 16, 4), (32, 512, 1024), 40, False,
                  False)]
        precisions = list(PRECISIONS)
    rows = []
    for name, make, shape, steps, aug, channels_last in cases:
        for p in precisions:
            row = measure(name, make, shape, steps, p, device, aug, channels_last)
            rows.append(row)
            print(json.dumps(row), flush=True)
    base = {r["model"]: r for r in rows if r["precision"] == "fp32"}
    for r in rows:
        b = base[r["model"]]
        r["speedup_vs_fp32"] = b["step_ms"] / r["step_ms"]
        r["memory_vs_fp32"] = r["peak_mib"] / b["peak_mib"] if b["peak_mib"] else float("nan")
    env = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
           "torch": torch.__version__}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu.json").write_text(json.dumps({"env": env, "rows": rows}, indent=2))
    lines = [f"GPU check on {env['device']}, torch {env['torch']}", "",
             "| model | precision | ms/step | speed-up vs fp32 | peak MiB | memory vs fp32 | "
             "no sync in steps |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['precision']} | {r['step_ms']:.2f} | "
                     f"{r['speedup_vs_fp32']:.2f}x | {r['peak_mib']:.0f} | "
                     f"{r['memory_vs_fp32']:.2f} | {r['no_sync_in_steps']} |")
    (args.out / "gpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""GPU check of the batch-size finder's CUDA path (under a minute on one GPU).

    PYTHONPATH=src python3 benchmarks/gpu_batchfind.py            # on a CUDA machine
    PYTHONPATH=src python3 benchmarks/gpu_batchfind.py --smoke    # tiny, on the CPU

On CUDA, for a conv model on mel-like inputs (activations grow with the batch):

1. ``find_batch_size`` with a budget of 1 GiB (``memory_budget``: the CUDA path's allocator
   peak against a budget): the table of probes; then, in a fresh measurement, one training
   step of the chosen micro-batch fits (peak x 1.1 <= budget) and one of twice it does not;
2. ``find_batch_size`` with the default budget (free device memory), target 256: no OOM
   escapes, and ``micro x accumulation == 256``;
3. an injected ``torch.OutOfMemoryError`` from a real allocation (a model that allocates
   far past the device's memory above a batch size) is caught: the largest fitting size is
   below it.

Prints one JSON object and writes it to ``$OUT/gpu_batchfind.json`` when ``$OUT`` is set; exit 1
when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

from advanced_training_utils.engine.batchfind import find_batch_size


class _Conv(nn.Module):
    """``[B, 1, F, T]`` -> logits."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class _Hog(nn.Module):
    """Allocates ``huge`` bytes on the device for a batch larger than ``above`` (a real OOM)."""

    def __init__(self, above: int, huge: int) -> None:
        super().__init__()
        self.lin, self.above, self.huge = nn.Linear(16, 4), above, huge

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.above:
            torch.empty(self.huge, dtype=torch.uint8, device=x.device)
        return self.lin(x)


def _step_peak(model: nn.Module, data: TensorDataset, size: int, device: torch.device) -> int:
    """The allocator peak of two plain AdamW steps of two accumulated micro-batches of ``size``
    items (as the finder probes a size below the target), measured afresh."""
    opt = torch.optim.AdamW(model.parameters())
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    try:
        for _ in range(2):
            opt.zero_grad(set_to_none=True)
            for _ in range(2):
                x, y = (t[:size].to(device) for t in data.tensors)
                nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    finally:
        for p in model.parameters():
            p.grad = None


def _check(smoke: bool) -> dict[str, Any]:
    device = torch.device("cpu" if smoke else "cuda")
    shape, n, width = ((1, 16, 16), 64, 4) if smoke else ((1, 64, 256), 512, 32)
    data = TensorDataset(torch.randn(n, *shape), torch.randint(0, 4, (n,)))
    budget = (1 << 22) if smoke else (1 << 30)
    out: dict[str, Any] = {"device": str(device)}
    model = _Conv(width).to(device)
    t0 = time.perf_counter()
    r = find_batch_size(model, data, nn.CrossEntropyLoss(), target_batch_size=256,
                        device=str(device), memory_budget=budget, verbose=False,
                        handle_signals=False, recovery=False, gradient_clip=None)
    out["budgeted"] = {**r.record(), "seconds": round(time.perf_counter() - t0, 2),
                       "table": r.table().splitlines()}
    b = r.micro_batch_size
    ok = b * r.accumulation_steps == 256
    if not smoke:
        fit, twice = _step_peak(model, data, b, device), _step_peak(model, data, 2 * b, device)
        out["budgeted"]["plain_step_peak"] = {"micro": fit, "twice": twice}
        ok = ok and fit * 1.1 <= budget < twice * 1.1
        t0 = time.perf_counter()
        d = find_batch_size(model, data, nn.CrossEntropyLoss(), target_batch_size=256,
                            device="cuda", verbose=False, handle_signals=False)
        out["default_budget"] = {**d.record(), "seconds": round(time.perf_counter() - t0, 2)}
        ok = ok and d.micro_batch_size * d.accumulation_steps == 256
        free, total = torch.cuda.mem_get_info(device)
        hog = _Hog(24, 2 * total).to(device)
        h = find_batch_size(hog, TensorDataset(torch.randn(64, 16), torch.randint(0, 4, (64,))),
                            nn.CrossEntropyLoss(), target_batch_size=64, device="cuda",
                            verbose=False, handle_signals=False)
        out["injected_oom"] = h.record()
        ok = ok and h.largest_fitting == 24
    out["ok"] = bool(ok)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU")
    args = p.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("gpu_batchfind: no CUDA device (use --smoke on the CPU)", file=sys.stderr)
        return 2
    out = _check(args.smoke)
    text = json.dumps(out, indent=2)
    print(text)
    if os.environ.get("OUT"):
        (Path(os.environ["OUT"]) / "gpu_batchfind.json").write_text(text + "\n")
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())

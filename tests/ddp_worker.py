"""Training script for the distributed tests, run under torchrun (gloo on the CPU).

    torchrun --standalone --nproc-per-node 2 tests/ddp_worker.py OUT MODE

MODE: 'same' (the plain run), 'different' (each rank's validation data differs), 'crash'
(per-step checkpoints, ``resume=True``; prints progress so a test can kill it), 'sleepy' (slow
steps, for killing one rank). Rank 0 writes OUT/final.pt; every rank writes OUT/rank{r}.json.
"""

import json
import os
import sys
import time
from pathlib import Path

import torch

from advanced_training_utils import train_model_advanced


def data(n, seed, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 12, generator=g) + shift
    return torch.utils.data.TensorDataset(x, (x[:, :3].sum(1) > 0).long())


def model():
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.Tanh(), torch.nn.Linear(32, 2))


def main() -> int:
    out, mode = Path(sys.argv[1]), sys.argv[2]
    rank = int(os.environ.get("RANK", "0"))
    (out / f"rank{rank}.pid").write_text(str(os.getpid()))
    torch.set_num_threads(1)
    train = torch.utils.data.DataLoader(data(128, 0), batch_size=8, shuffle=True)
    val_ds = data(64, 1, shift=(3.0 * rank if mode == "different" else 0.0))
    val = torch.utils.data.DataLoader(val_ds, batch_size=16)
    m = model()
    ce = torch.nn.CrossEntropyLoss()
    opts = dict(epochs=4, learning_rate=3e-3, device="cpu", verbose=False, seed=0,
                scheduler_type="plateau", patience=0, restore_best_weights=False,
                checkpoint_dir=out / "ckpt", model_name="ddp")
    crit = ce
    if mode == "different":
        opts.update(epochs=30, early_stop_patience=3, learning_rate=0.05)
    if mode in ("crash", "sleepy"):
        opts.update(epochs=8, checkpoint_every_n_steps=1, resume=True)
        calls = [0]

        def crit(o, y):
            calls[0] += 1
            if rank == 0:
                print(f"batch {calls[0]}", flush=True)
            if mode == "sleepy":
                time.sleep(0.05)
            return ce(o, y)
    res = train_model_advanced(m, train, val, crit, **opts)
    if rank == 0:
        torch.save(m.state_dict(), out / "final.pt")
    lrs = [h["lr"] for h in res["history"]]
    (out / f"rank{rank}.json").write_text(json.dumps(
        {"epochs_run": res["epochs_run"], "lrs": lrs, "stopped_early": res["stopped_early"],
         "val": [h["val_loss"] for h in res["history"]]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Training script for the distributed tests, run under torchrun (gloo on the CPU).

    torchrun --standalone --nproc-per-node 2 tests/ddp_worker.py OUT MODE

MODE: 'same' (the plain run), 'different' (each rank's validation data differs), 'crash'
(per-step checkpoints, ``resume=True``; prints progress so a test can kill it), 'sleepy' (slow
steps, for killing one rank). Rank 0 writes OUT/final.pt; every rank writes OUT/rank{r}.json.
'cases' runs several short trainings in one launch (see :func:`cases`) and writes
OUT/{case}_rank{r}.pt and OUT/cases_rank{r}.json.
"""

import json
import os
import random
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import (
    DataLoader,
    RandomSampler,
    Sampler,
    SubsetRandomSampler,
    WeightedRandomSampler,
)

from advanced_training_utils import train_model_advanced


def data(n, seed, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 12, generator=g) + shift
    return torch.utils.data.TensorDataset(x, (x[:, :3].sum(1) > 0).long())


def model():
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.Tanh(), torch.nn.Linear(32, 2))


# ---------------------------------------------------------------- 'cases' (custom samplers...)
CASE_OPTS = dict(epochs=3, learning_rate=3e-3, device="cpu", verbose=False, seed=0,
                 use_scheduler=False, restore_best_weights=False)
_SPLIT = torch.randperm(128, generator=torch.Generator().manual_seed(7)).tolist()
TRAIN_IDX, VAL_IDX = _SPLIT[:64], _SPLIT[64:127]  # a train/val split of one dataset; 63: odd
WEIGHTS = [float(3 * (i % 4 == 0) + (i % 4 == 2)) for i in range(128)]  # odd items: weight 0
SAMPLER_CASES = ("subset", "weighted", "replacement", "torch_rng", "batch_sampler")
SPIKE_AT, NAN_AT = 10, 13  # global steps: a loss spike on rank 0 only, a NaN on rank 1 only


class TorchRNGSampler(Sampler):
    """A user's sampler that draws from the global torch RNG (48 of 128 items)."""

    def __len__(self):
        return 48

    def __iter__(self):
        return iter(torch.randperm(128)[:48].tolist())


class PyRandomBatches(Sampler):
    """A user's batch sampler that draws from Python's random: 9 batches of 8."""

    def __len__(self):
        return 9

    def __iter__(self):
        idx = random.sample(range(128), 72)
        return iter([idx[i:i + 8] for i in range(0, 72, 8)])


def case_sampler(name):
    """(sampler or batch sampler, is_batch_sampler) of a sampler case (fresh objects)."""
    return {"subset": (lambda: SubsetRandomSampler(TRAIN_IDX), False),
            "weighted": (lambda: WeightedRandomSampler(WEIGHTS, 64), False),
            "replacement": (lambda: RandomSampler(range(128), replacement=True, num_samples=64),
                            False),
            "torch_rng": (lambda: TorchRNGSampler(), False),
            "batch_sampler": (lambda: PyRandomBatches(), True)}[name]


def case_val(name, ds):
    """The subset case validates on the other part of the split; the others on 13 items."""
    if name == "subset":
        return DataLoader(ds, batch_size=16, sampler=SubsetRandomSampler(VAL_IDX))
    return DataLoader(data(13, 1), batch_size=4)


class Recorded(torch.utils.data.Dataset):
    """Records the indices fetched with grad enabled (training, not validation)."""

    def __init__(self, base):
        self.base, self.seen = base, []

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        if torch.is_grad_enabled():
            self.seen.append(int(i))
        return self.base[i]


class Crash(Exception):
    pass


def faulty_ce(rank, spike_at=None, nan_at=None, crash_at=None):
    """Cross-entropy; at the given training steps: +1000 (a loss spike with unchanged
    gradients), NaN, or a crash."""
    ce, calls = torch.nn.CrossEntropyLoss(), [0]

    def crit(o, y):
        loss = ce(o, y)
        if not torch.is_grad_enabled():
            return loss
        calls[0] += 1
        if calls[0] == crash_at:
            raise Crash
        if calls[0] == spike_at:
            return loss + 1000.0
        if calls[0] == nan_at:
            return loss * float("nan")
        return loss
    return crit


def cases(out, rank):
    """Several trainings in one launch: each wrapped sampler kind, a mid-epoch resume with two of
    them, a BatchNorm model with uneven validation shards, a spike on one rank only."""
    dist.init_process_group("gloo")  # train_model_advanced then leaves the group alone
    res = {}
    for name in SAMPLER_CASES:
        make, batches = case_sampler(name)
        ds = Recorded(data(128, 0))
        train = (DataLoader(ds, batch_sampler=make()) if batches
                 else DataLoader(ds, batch_size=8, sampler=make()))
        m = model()
        h = train_model_advanced(m, train, case_val(name, ds), torch.nn.CrossEntropyLoss(),
                                 metrics={"out0": lambda o, y: o[:, 0].mean()}, **CASE_OPTS)
        torch.save(m.state_dict(), out / f"{name}_rank{rank}.pt")
        res[name] = {"val": [e["val_loss"] for e in h["history"]], "seen": ds.seen,
                     "out0": [e["val_out0"] for e in h["history"]]}
    for name in ("torch_rng", "batch_sampler"):  # crash mid-epoch 2, resume: the same weights
        make, batches = case_sampler(name)
        opts = dict(CASE_OPTS, checkpoint_dir=out / f"ck_{name}", checkpoint_every_n_steps=1,
                    resume=True)
        for crash_at in (7, None):
            ds = data(128, 0)
            train = (DataLoader(ds, batch_sampler=make()) if batches
                     else DataLoader(ds, batch_size=8, sampler=make()))
            m = model()
            try:
                train_model_advanced(m, train, case_val(name, ds),
                                     faulty_ce(rank, crash_at=crash_at), **opts)
            except Crash:
                continue
            torch.save(m.state_dict(), out / f"{name}_resumed_rank{rank}.pt")
    train = DataLoader(data(128, 0), batch_size=8, shuffle=True)
    torch.manual_seed(1)
    bn = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.BatchNorm1d(16),
                             torch.nn.Tanh(), torch.nn.Linear(16, 2))
    h = train_model_advanced(bn, train, DataLoader(data(13, 1), batch_size=3),
                             torch.nn.CrossEntropyLoss(), **CASE_OPTS)
    x, y = data(13, 1).tensors
    bn.eval()
    res["bn"] = {"val": h["history"][-1]["val_loss"],
                 "local_val": torch.nn.functional.cross_entropy(bn(x), y).item()}
    m = model()
    h = train_model_advanced(m, train, DataLoader(data(64, 1), batch_size=16),
                             faulty_ce(rank, spike_at=SPIKE_AT if rank == 0 else None,
                                       nan_at=NAN_AT if rank == 1 else None),
                             spike_window=4, **CASE_OPTS)
    torch.save(m.state_dict(), out / f"spike_rank{rank}.pt")
    res["spike"] = {"skipped": h["skipped_steps"],
                    "per_epoch": [e["skipped_steps"] for e in h["history"]]}
    m = model()  # compile=True under DDP: the eager 'uar' case's weights; plain checkpoint keys
    train_model_advanced(m, train, DataLoader(data(13, 1), batch_size=3),
                         torch.nn.CrossEntropyLoss(), compile=True,
                         compile_options={"backend": "aot_eager"},
                         checkpoint_dir=out / "ck_compiled", **CASE_OPTS)
    torch.save(m.state_dict(), out / f"compiled_rank{rank}.pt")
    res.update(metric_cases(out, rank, train))
    res["averaged"] = averaging_case(out, rank, train)
    res["callback"] = callback_cases(rank, train)
    (out / f"cases_rank{rank}.json").write_text(json.dumps(res))
    dist.destroy_process_group()
    return 0


def averaging_case(out, rank, train):
    """EMA + SWA (a BatchNorm model, each rank's batch-norm pass on its shard) + eval_ema, a NaN
    loss on rank 1 only: every rank keeps the same averages and validation values."""
    torch.manual_seed(1)
    bn = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.BatchNorm1d(16),
                             torch.nn.Tanh(), torch.nn.Linear(16, 2))
    h = train_model_advanced(bn, train, DataLoader(data(13, 1), batch_size=3),
                             faulty_ce(rank, nan_at=NAN_AT if rank == 1 else None),
                             ema_decay=0.9, swa_start=2, eval_ema=True, **CASE_OPTS)
    torch.save(h["averaged_weights"], out / f"averaged_rank{rank}.pt")
    return {"val": [e["val_loss"] for e in h["history"]], "skipped": h["skipped_steps"],
            "best_weights": h["best_weights"]}


CLS_METRICS = ["uar", "macro_f1", "accuracy", "per_class_recall"]


def regression_data(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 12, generator=g)
    return torch.utils.data.TensorDataset(x, torch.tanh(x[:, :2]) + 0.3 * torch.randn(n, 2, generator=g))


def callback_cases(rank, train):
    """on_epoch_end answering differently per rank: rank 0's answer holds on every rank."""
    res = {}
    for case, stop_rank in (("rank1_asks", 1), ("rank0_asks", 0)):
        rows = []

        def ask(row, stop_rank=stop_rank, rows=rows):
            rows.append(row["val_loss"])
            return rank == stop_rank and row["epoch"] == 1

        h = train_model_advanced(model(), train, DataLoader(data(64, 1), batch_size=16),
                                 torch.nn.CrossEntropyLoss(), on_epoch_end=ask, **CASE_OPTS)
        res[case] = {"epochs_run": h["epochs_run"], "stopped": h["stopped_by_callback"],
                     "rows": rows}
    return res


def metric_cases(out, rank, train):
    """Epoch metrics on uneven validation shards (13 items in batches of 3): classification
    (UAR, macro-F1...) and regression (CCC, MAE); the final weights are saved."""
    res = {}
    m = model()
    h = train_model_advanced(m, train, DataLoader(data(13, 1), batch_size=3),
                             torch.nn.CrossEntropyLoss(), metrics=CLS_METRICS, **CASE_OPTS)
    torch.save(m.state_dict(), out / f"uar_rank{rank}.pt")
    res["uar"] = h["history"][-1]
    m = model()
    h = train_model_advanced(m, DataLoader(regression_data(128, 0), batch_size=8, shuffle=True),
                             DataLoader(regression_data(13, 1), batch_size=3),
                             torch.nn.MSELoss(), metrics=["ccc", "mae"], **CASE_OPTS)
    torch.save(m.state_dict(), out / f"ccc_rank{rank}.pt")
    res["ccc"] = h["history"][-1]
    return res


def main() -> int:
    out, mode = Path(sys.argv[1]), sys.argv[2]
    rank = int(os.environ.get("RANK", "0"))
    (out / f"rank{rank}.pid").write_text(str(os.getpid()))
    torch.set_num_threads(1)
    if mode == "cases":
        return cases(out, rank)
    train = torch.utils.data.DataLoader(data(128, 0), batch_size=8, shuffle=True)
    val_ds = data(64, 1, shift=(3.0 * rank if mode == "different" else 0.0))
    val = torch.utils.data.DataLoader(val_ds, batch_size=16)
    m = model()
    ce = torch.nn.CrossEntropyLoss()
    opts = dict(epochs=4, learning_rate=3e-3, device="cpu", verbose=False, seed=0,
                scheduler_type="plateau", plateau_patience=0, restore_best_weights=False,
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

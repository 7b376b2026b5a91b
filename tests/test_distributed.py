"""train_model_advanced under torchrun (2 processes, gloo on the CPU)."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

import ddp_worker
from advanced_training_utils import load_checkpoint, train_model_advanced

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("ddp_worker.py")


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("WORLD_SIZE", None)
    return env


def _torchrun(out, mode, **kw):
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(WORKER), str(out), mode], env=_env(), text=True, start_new_session=True, **kw)


def _wait(p, timeout):
    try:
        return p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        raise


class _GlobalBatches:
    """One process seeing, per step, the union of both ranks' DistributedSampler batches."""

    class _Sampler:
        epoch = 0

        def set_epoch(self, e):
            self.epoch = e

    def __init__(self, ds, local_batch, world=2, seed=0):
        self.ds, self.b, self.world, self.seed = ds, local_batch, world, seed
        self.sampler = self._Sampler()

    def __len__(self):
        return len(self.ds) // self.world // self.b

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.sampler.epoch)
        perm = torch.randperm(len(self.ds), generator=g).tolist()
        shards = [perm[r::self.world] for r in range(self.world)]
        for s in range(len(self)):
            idx = [i for sh in shards for i in sh[s * self.b:(s + 1) * self.b]]
            x, y = zip(*[self.ds[i] for i in idx])
            yield torch.stack(x), torch.stack(y)


def test_two_processes_match_one_over_the_same_global_batch(tmp_path):
    p = _torchrun(tmp_path, "same")
    assert _wait(p, 120) == 0
    ddp = torch.load(tmp_path / "final.pt", weights_only=True)
    m = ddp_worker.model()
    val = torch.utils.data.DataLoader(ddp_worker.data(64, 1), batch_size=16)
    train_model_advanced(m, _GlobalBatches(ddp_worker.data(128, 0), 8), val,
                         torch.nn.CrossEntropyLoss(), epochs=4, learning_rate=3e-3,
                         device="cpu", verbose=False, seed=0, scheduler_type="plateau",
                         patience=0, restore_best_weights=False)
    for k, v in m.state_dict().items():
        assert torch.allclose(v, ddp[k], rtol=0, atol=1e-6), k
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0 == r1
    # exactly one set of checkpoint files (rank 0 writes)
    names = sorted(f.name for f in (tmp_path / "ckpt").iterdir())
    assert names == ["ddp.lock", "ddp_best.pt", "ddp_last.1.pt", "ddp_last.pt",
                     "ddp_metrics.jsonl"]  # ddp.lock: the run's lock (rank 0 only)
    assert len(load_checkpoint(tmp_path / "ckpt" / "ddp_last.pt")["ranks"]) == 2


def test_ranks_with_different_losses_take_the_same_decisions(tmp_path):
    p = _torchrun(tmp_path, "different")
    assert _wait(p, 180) == 0  # a hang fails here
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["epochs_run"] == r1["epochs_run"] and r0["stopped_early"] == r1["stopped_early"]
    assert r0["lrs"] == r1["lrs"] and r0["val"] == r1["val"]
    assert len(set(r0["lrs"])) > 1  # the plateau scheduler did step down, on both ranks alike
    assert r0["stopped_early"] and r0["epochs_run"] < 30


def test_kill_9_both_processes_then_resume_under_torchrun(tmp_path):
    ref = tmp_path / "ref"
    ref.mkdir()
    assert _wait(_torchrun(ref, "crash", stdout=subprocess.DEVNULL), 180) == 0
    run = tmp_path / "run"
    run.mkdir()
    rng = random.Random(5)
    for _ in range(2):
        p = _torchrun(run, "crash", stdout=subprocess.PIPE)
        for _ in range(rng.randint(10, 40)):
            if not p.stdout.readline():
                break
        os.killpg(p.pid, signal.SIGKILL)  # the launcher and both workers
        p.wait(timeout=30)
    assert _wait(_torchrun(run, "crash", stdout=subprocess.DEVNULL), 180) == 0
    a = torch.load(ref / "final.pt", weights_only=True)
    b = torch.load(run / "final.pt", weights_only=True)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_killing_one_rank_ends_the_job_quickly(tmp_path):
    p = _torchrun(tmp_path, "sleepy", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for _ in range(5):
        assert p.stdout.readline()
    rank1 = int((tmp_path / "rank1.pid").read_text())
    t0 = time.monotonic()
    os.kill(rank1, signal.SIGKILL)
    rc = _wait(p, 60)
    elapsed = time.monotonic() - t0
    err = p.stderr.read()
    assert rc != 0 and elapsed < 60
    assert "ddp_worker.py FAILED" in err or "Signal 9" in err or "SIGKILL" in err

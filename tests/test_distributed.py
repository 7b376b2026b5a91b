"""train_model_advanced under torchrun (2 processes, gloo on the CPU)."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    DistributedSampler,
    RandomSampler,
    SequentialSampler,
    SubsetRandomSampler,
    WeightedRandomSampler,
)

import ddp_worker
from advanced_training_utils import load_checkpoint, train_model_advanced
from advanced_training_utils.engine.distributed import DistContext, ShardedSampler

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
                         plateau_patience=0, restore_best_weights=False)
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


# ---------------------------------------------------------------- the user's own samplers
def _draw(sampler, seed, batches=False):
    """The documented rule, written out: the sampler's draw with every RNG seeded by ``seed``
    and a fresh seeded generator in place of its own."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        state = random.getstate()
        random.seed(seed)
        if hasattr(sampler, "generator"):
            sampler.generator = torch.Generator().manual_seed(seed)
        items = [list(b) for b in sampler] if batches else list(sampler)
        random.setstate(state)
    return items


class _GlobalDraws(_GlobalBatches):
    """One process seeing, per step, the union of both ranks' batches of a wrapped sampler
    (the rule of ``distributed.ShardedSampler``: pad by repeating the start, deal round-robin)."""

    def __init__(self, ds, name, local_batch=8, world=2, seed=0):
        super().__init__(ds, local_batch, world, seed)
        self.make, self.batches = ddp_worker.case_sampler(name)

    def _steps(self):
        items = _draw(self.make(), self.seed + self.sampler.epoch, self.batches)
        items += items[:-len(items) % self.world]
        shards = [items[r::self.world] for r in range(self.world)]
        if not self.batches:
            shards = [[sh[i:i + self.b] for i in range(0, len(sh), self.b)] for sh in shards]
        return [[i for sh in shards for i in sh[s]] for s in range(len(shards[0]))]

    def __len__(self):
        return len(self._steps())

    def __iter__(self):
        for idx in self._steps():
            x, y = zip(*[self.ds[i] for i in idx])
            yield torch.stack(x), torch.stack(y)


@pytest.fixture(scope="module")
def cases_run(tmp_path_factory):
    """One torchrun launch for every 'cases' check (see ddp_worker.cases)."""
    out = tmp_path_factory.mktemp("cases")
    assert _wait(_torchrun(out, "cases"), 300) == 0
    return out, [json.loads((out / f"cases_rank{r}.json").read_text()) for r in (0, 1)]


def _weights(path):
    return torch.load(path, weights_only=True)


def _metric_out0(o, y):
    return o[:, 0].mean()


@pytest.mark.parametrize("name", ddp_worker.SAMPLER_CASES)
def test_each_rank_trains_on_its_share_of_the_samplers_own_draws(cases_run, name):
    out, ranks = cases_run
    ds = ddp_worker.data(128, 0)
    m = ddp_worker.model()
    ref = train_model_advanced(m, _GlobalDraws(ds, name), ddp_worker.case_val(name, ds),
                               torch.nn.CrossEntropyLoss(), metrics={"out0": _metric_out0},
                               **ddp_worker.CASE_OPTS)
    for r in (0, 1):
        ddp = _weights(out / f"{name}_rank{r}.pt")
        for k, v in m.state_dict().items():
            assert torch.allclose(v, ddp[k], rtol=0, atol=1e-6), (r, k)
        assert ranks[r][name]["val"] == pytest.approx(
            [e["val_loss"] for e in ref["history"]], abs=1e-6, rel=0)
        assert ranks[r][name]["out0"] == pytest.approx(
            [e["val_out0"] for e in ref["history"]], abs=1e-6, rel=0)
    seen = set(ranks[0][name]["seen"]) | set(ranks[1][name]["seen"])
    allowed = {"subset": set(ddp_worker.TRAIN_IDX),
               "weighted": {i for i, w in enumerate(ddp_worker.WEIGHTS) if w > 0}}
    assert seen <= allowed.get(name, set(range(128)))


def test_validation_items_are_counted_once_on_an_odd_validation_set(cases_run):
    out, ranks = cases_run
    m = ddp_worker.model()
    m.load_state_dict(_weights(out / "torch_rng_rank0.pt"))
    x, y = ddp_worker.data(13, 1).tensors
    with torch.no_grad():
        o = m(x)
    per_item = torch.nn.functional.cross_entropy(o, y, reduction="none").double()
    val, out0 = per_item.mean().item(), o[:, 0].double().mean().item()
    # DistributedSampler's padding would count item 0 twice: that must change both numbers.
    assert abs((per_item.sum() + per_item[0]).item() / 14 - val) > 1e-4
    assert abs((o[:, 0].sum() + o[0, 0]).item() / 14 - out0) > 1e-4
    for r in (0, 1):
        assert ranks[r]["torch_rng"]["val"][-1] == pytest.approx(val, abs=1e-6, rel=0)
        assert ranks[r]["torch_rng"]["out0"][-1] == pytest.approx(out0, abs=1e-6, rel=0)


def _ccc(p, t):
    """Lin's CCC per column with population moments (numpy float64)."""
    mp, mt = p.mean(0), t.mean(0)
    cov = ((p - mp) * (t - mt)).mean(0)
    return 2 * cov / (p.var(0) + t.var(0) + (mp - mt) ** 2)


def test_epoch_metrics_under_two_processes_equal_one_process_on_the_whole_set(cases_run):
    """UAR, macro-F1, recall, CCC, MAE from statistics summed over the ranks' uneven validation
    shards (7 + 6 items, no padding) equal the metrics of the whole set in one process."""
    sk = pytest.importorskip("sklearn.metrics")
    out, ranks = cases_run
    m = ddp_worker.model()
    m.load_state_dict(_weights(out / "uar_rank0.pt"))
    x, y = ddp_worker.data(13, 1).tensors
    with torch.no_grad():
        pred = m(x).argmax(1).numpy()
    y = y.numpy()
    whole = {"val_uar": sk.balanced_accuracy_score(y, pred),
             "val_macro_f1": sk.f1_score(y, pred, average="macro"),
             "val_accuracy": sk.accuracy_score(y, pred),
             **{f"val_recall_{k}": r for k, r in enumerate(sk.recall_score(y, pred, average=None))}}
    shard = sk.balanced_accuracy_score(y[0::2], pred[0::2])  # what rank 0 alone would report
    assert abs(shard - whole["val_uar"]) > 1e-3
    m.load_state_dict(_weights(out / "ccc_rank0.pt"))
    x, t = ddp_worker.regression_data(13, 1).tensors
    with torch.no_grad():
        p = m(x).double().numpy()
    t = t.double().numpy()
    ccc = _ccc(p, t)
    mae = np.abs(p - t).mean(0)
    reg = {"val_ccc": ccc.mean(), "val_mae": mae.mean(), "val_ccc_0": ccc[0], "val_ccc_1": ccc[1],
           "val_mae_0": mae[0], "val_mae_1": mae[1]}
    assert abs(_ccc(p[0::2], t[0::2]).mean() - reg["val_ccc"]) > 1e-3
    for r in (0, 1):
        assert {k: ranks[r]["uar"][k] for k in whole} == pytest.approx(whole, abs=1e-12, rel=0)
        assert {k: ranks[r]["ccc"][k] for k in reg} == pytest.approx(reg, abs=1e-6, rel=0)


def test_uneven_validation_shards_with_batchnorm_finish_on_rank_0s_buffers(cases_run):
    # 13 items in batches of 3: rank 0 evaluates 3 batches, rank 1 two (no collective per batch)
    _, ranks = cases_run
    assert ranks[0]["bn"]["val"] == ranks[1]["bn"]["val"]
    for r in (0, 1):  # every rank evaluated with rank 0's BatchNorm statistics
        assert ranks[r]["bn"]["val"] == pytest.approx(ranks[r]["bn"]["local_val"], abs=1e-6)


def test_every_rank_keeps_the_same_averages_and_validates_them_alike(cases_run):
    """EMA and SWA under DDP: each rank keeps its own average of identical weights (a NaN on
    rank 1 is skipped on both, by both EMAs); SWA's batch-norm statistics are rank 0's."""
    out, ranks = cases_run
    assert ranks[0]["averaged"] == ranks[1]["averaged"]
    assert ranks[0]["averaged"]["skipped"] == 1 and ranks[0]["averaged"]["best_weights"] == "swa"
    a, b = (_weights(out / f"averaged_rank{r}.pt") for r in (0, 1))
    assert a.keys() == b.keys() == {"ema", "swa"}
    for kind in a:
        for k in a[kind]:
            assert torch.equal(a[kind][k], b[kind][k]), (kind, k)


@pytest.mark.parametrize("name", ["torch_rng", "batch_sampler"])
def test_mid_epoch_resume_with_a_wrapped_sampler_is_exact(cases_run, name):
    out, _ = cases_run
    for r in (0, 1):
        a, b = _weights(out / f"{name}_rank{r}.pt"), _weights(out / f"{name}_resumed_rank{r}.pt")
        for k in a:
            assert torch.equal(a[k], b[k]), (r, k)


def test_compile_under_ddp_trains_like_eager_and_saves_plain_keys(cases_run):
    """compile=True (aot_eager) under two processes: the weights of the same eager run (the
    'uar' case: metrics change no weight), within float32 rounding; the checkpoint's model
    keys carry neither 'module.' (DDP) nor '_orig_mod.' (torch.compile)."""
    out, _ = cases_run
    for r in (0, 1):
        compiled, eager = _weights(out / f"compiled_rank{r}.pt"), _weights(out / f"uar_rank{r}.pt")
        for k in eager:
            torch.testing.assert_close(compiled[k], eager[k], rtol=1e-6, atol=1e-7)
    saved = load_checkpoint(out / "ck_compiled" / "model_last.pt")["model"]
    assert list(saved) == list(ddp_worker.model().state_dict())


def test_a_loss_spike_on_one_rank_is_skipped_on_both(cases_run):
    # Rank 0's loss spikes (+1000, gradients unchanged) at step SPIKE_AT, rank 1's is NaN at
    # NAN_AT: both ranks must skip both steps, like one process that sees both batches.
    out, ranks = cases_run
    m = ddp_worker.model()
    ref = train_model_advanced(
        m, _GlobalBatches(ddp_worker.data(128, 0), 8), DataLoader(ddp_worker.data(64, 1),
                                                                  batch_size=16),
        ddp_worker.faulty_ce(0, spike_at=ddp_worker.SPIKE_AT, nan_at=ddp_worker.NAN_AT),
        spike_window=4, **ddp_worker.CASE_OPTS)
    w0, w1 = _weights(out / "spike_rank0.pt"), _weights(out / "spike_rank1.pt")
    for k, v in m.state_dict().items():
        assert torch.equal(w0[k], w1[k]), k
        assert torch.allclose(v, w0[k], rtol=0, atol=1e-6), k
    assert ref["skipped_steps"] == 2
    for r in (0, 1):
        assert ranks[r]["spike"] == {"skipped": 2, "per_epoch": [0, 2, 0]}


_INNER = {
    "subset": lambda: SubsetRandomSampler(list(range(3, 20, 2))),
    "weighted": lambda: WeightedRandomSampler([0.0, 1.0, 2.0, 0.0, 5.0] * 3, 11),
    "replacement": lambda: RandomSampler(range(9), replacement=True, num_samples=7),
    "torch_rng": ddp_worker.TorchRNGSampler,
    "sequence": lambda: range(7),
}


@pytest.mark.parametrize("even", [True, False])
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("kind", list(_INNER))
def test_sharded_sampler_deals_one_draw_among_the_ranks(kind, world, even):
    shards = []
    for r in range(world):  # each rank builds its own wrapper around its own copy
        s = ShardedSampler(_INNER[kind](), num_replicas=world, rank=r, seed=5, even=even)
        s.set_epoch(3)
        shards.append(list(s))
        assert len(s) == len(shards[-1])
    draw = _draw(_INNER[kind](), 5 + 3)
    if even:
        assert len({len(sh) for sh in shards}) == 1
        draw += draw[:-len(draw) % world]
    merged = [sh[i] for i in range(len(shards[0])) for sh in shards if i < len(sh)]
    assert merged == draw


def test_sharded_sampler_leaves_the_users_rngs_and_generator_alone():
    np = pytest.importorskip("numpy")
    g = torch.Generator().manual_seed(11)
    inner = RandomSampler(range(10), generator=g)
    g_state, t_state, p_state = g.get_state(), torch.get_rng_state(), random.getstate()
    n_state = np.random.get_state()[1].copy()
    s = ShardedSampler(inner, num_replicas=2, rank=0, seed=1)
    first = list(s)
    assert inner.generator is g and torch.equal(g.get_state(), g_state)
    assert torch.equal(torch.get_rng_state(), t_state) and random.getstate() == p_state
    assert (np.random.get_state()[1] == n_state).all()
    assert list(s) == first  # a function of (seed, epoch)
    s.set_epoch(1)
    assert list(s) != first


def test_sharded_sampler_forwards_set_epoch_and_checks_its_arguments():
    inner = DistributedSampler(range(8), num_replicas=1, rank=0)
    ShardedSampler(inner, num_replicas=2, rank=1).set_epoch(4)
    assert inner.epoch == 4
    with pytest.raises(ValueError, match=r"rank must be in \[0, 1\], got 2"):
        ShardedSampler(range(4), num_replicas=2, rank=2)


def test_ranks_that_draw_differently_raise_instead_of_overlapping():
    s = ShardedSampler(range(4), num_replicas=2, rank=0, agree=lambda d: [d, b"other"],
                       name="train_loader")
    with pytest.raises(ValueError, match="train_loader: its sampler range drew a different "
                                         "sequence on each rank in epoch 0"):
        list(s)


@pytest.fixture
def two_rank_context(tmp_path):
    """A DistContext that believes it is rank 1 of 2 (over a 1-process gloo group)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        yield DistContext(world_size=2, rank=1)
    finally:
        dist.destroy_process_group()


def test_shard_keeps_plain_loaders_on_distributed_sampler_and_wraps_the_others(two_rank_context):
    ctx, ds = two_rank_context, ddp_worker.data(10, 0)
    for shuffle in (True, False):  # unchanged: DistributedSampler semantics
        s = ctx.shard(DataLoader(ds, batch_size=2, shuffle=shuffle), 3, train=True).sampler
        assert type(s) is DistributedSampler and s.shuffle is shuffle and s.seed == 3
    sub = SubsetRandomSampler([1, 2])
    s = ctx.shard(DataLoader(ds, batch_size=2, sampler=sub), 3, train=True).sampler
    assert isinstance(s, ShardedSampler) and s.inner is sub and s.even and s.rank == 1
    bs = BatchSampler(RandomSampler(ds), 3, True)  # torch's own BatchSampler: a plain loader
    sharded = ctx.shard(DataLoader(ds, batch_sampler=bs), 3, train=True)
    assert type(sharded.sampler) is DistributedSampler and sharded.sampler.shuffle
    assert sharded.batch_size == 3 and sharded.drop_last
    custom = type("Custom", (BatchSampler,), {})(SequentialSampler(ds), 2, False)
    b = ctx.shard(DataLoader(ds, batch_sampler=custom), 3, train=True).batch_sampler
    assert isinstance(b, ShardedSampler) and b.inner is custom and b.batches
    v = ctx.shard(DataLoader(ds, batch_size=4), 3, train=False).sampler
    assert isinstance(v, ShardedSampler) and not v.even and len(v) == 5


def test_the_epoch_callback_takes_rank_0s_answer_on_every_rank(cases_run):
    _, ranks = cases_run
    r0, r1 = ranks[0]["callback"], ranks[1]["callback"]
    epochs = ddp_worker.CASE_OPTS["epochs"]
    # rank 1 alone asks to stop after epoch 1: rank 0's answer (go on) holds on both
    assert [r["rank1_asks"]["epochs_run"] for r in (r0, r1)] == [epochs, epochs]
    assert [r["rank1_asks"]["stopped"] for r in (r0, r1)] == [False, False]
    # rank 0 alone asks: both stop after epoch 1, each having been called once
    assert [r["rank0_asks"]["epochs_run"] for r in (r0, r1)] == [1, 1]
    assert [r["rank0_asks"]["stopped"] for r in (r0, r1)] == [True, True]
    assert r0["rank0_asks"]["rows"] == r1["rank0_asks"]["rows"]  # the same numbers on each rank
    assert r0["rank1_asks"]["rows"] == r1["rank1_asks"]["rows"]

"""engine/averaging.py: EMA and SWA inside train_model_advanced, against hand computations.

The references: a plain loop with the same optimizer and a hand EMA with its warm-up (float64),
a hand equal average of the epoch-end weights, torch.optim.swa_utils.update_bn, and
uninterrupted runs for the resumes.
"""

import copy

import pytest
import torch

from _helpers import Boom, crashing
from advanced_training_utils import checkpoint as ck
from advanced_training_utils import load_checkpoint, train_model_advanced
from advanced_training_utils.engine.averaging import (
    EMA,
    SWA,
    NoAverage,
    ema_decay_at,
    recompute_bn,
)
from advanced_training_utils.engine.config import TrainConfig
from advanced_training_utils.engine.health.recovery import Recovery

CE = torch.nn.CrossEntropyLoss()
LR = 0.02


def _data(n=100, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g, dtype=dtype)
    return torch.utils.data.TensorDataset(x, (x[:, :2].sum(1) > 0).long())


def _model(seed=0, bn=True, dropout=0.0):
    torch.manual_seed(seed)
    layers = [torch.nn.Linear(6, 12)]
    layers += [torch.nn.BatchNorm1d(12)] if bn else []
    layers += [torch.nn.Tanh(), torch.nn.Dropout(dropout), torch.nn.Linear(12, 2)]
    return torch.nn.Sequential(*layers).double()


def _adamw(params):
    return torch.optim.AdamW(params, lr=LR, fused=True)  # steps skipped on the device


# A run whose steps are those of the hand loop: no clipping, no schedule, no spike detection.
PLAIN = dict(device="cpu", verbose=False, optimizer=_adamw, gradient_clip=None,
             use_scheduler=False, spike_factor=None, restore_best_weights=False)


def _hand(model, loader, epochs, decay, bad_steps=(), warmup=True):
    """The plain loop: AdamW on every good step, then the hand EMA (skipped on bad steps).

    Returns the EMA's parameters by name, its update count, and after each epoch its weights
    with the live buffers (the EMA copy's state dict then).
    """
    opt = _adamw(model.parameters())
    avg = {k: p.detach().clone() for k, p in model.named_parameters()}
    n, step, per_epoch = 0, 0, []
    for _ in range(epochs):
        model.train()
        for x, y in loader:
            step += 1
            opt.zero_grad(set_to_none=True)
            CE(model(x), y).backward()
            if step in bad_steps:
                continue  # the guard skips it: no optimizer step, no EMA update
            opt.step()
            w = 1.0 - ema_decay_at(n, decay, warmup)
            with torch.no_grad():
                for k, p in model.named_parameters():
                    avg[k] += w * (p - avg[k])
            n += 1
        per_epoch.append({**{k: v.clone() for k, v in avg.items()},
                          **{k: b.clone() for k, b in model.named_buffers()}})
    return avg, n, per_epoch


def _nan_at(steps):
    """A criterion whose loss (and so every gradient) is NaN at the given training calls."""
    calls = [0]

    def crit(out, y):
        loss = CE(out, y)
        if not out.requires_grad:  # validation
            return loss
        calls[0] += 1
        return loss * float("nan") if calls[0] in steps else loss
    return crit


def _assert_params(avg, weights, exact=True):
    for k, v in avg.items():
        if exact:
            assert torch.equal(weights[k], v), k
        else:
            assert torch.allclose(weights[k], v, rtol=0, atol=1e-12), k


# ---------------------------------------------------------------- EMA: the hand computation
@pytest.mark.parametrize("warmup", [True, False])
def test_ema_equals_a_hand_computation_over_100_steps(warmup):
    """100 optimizer steps (10 epochs of 10 batches), float64: the run's EMA is the hand EMA
    (decay warm-up min(d, (1 + n) / (10 + n)) or none) exactly; buffers are the live ones."""
    loader = torch.utils.data.DataLoader(_data(), batch_size=10)
    m = _model()
    r = train_model_advanced(m, loader, None, CE, epochs=10, ema_decay=0.95,
                             ema_warmup=warmup, **PLAIN)
    hand_model = _model()
    avg, n, _ = _hand(hand_model, loader, 10, 0.95, warmup=warmup)
    assert n == 100
    _assert_params({k: p for k, p in hand_model.named_parameters()}, dict(m.named_parameters()))
    ema = r["averaged_weights"]["ema"]
    _assert_params(avg, ema)
    for k, b in m.named_buffers():  # buffers (BatchNorm statistics) are copied, not averaged
        assert torch.equal(ema[k], b), k
    assert not torch.equal(ema["0.weight"], m[0].weight)  # the average is not the live model


def test_no_ema_update_on_skipped_steps():
    """Non-finite losses at chosen steps: the guard skips them; so does the EMA (its counter
    is the number of good steps), exactly as the hand reference that skips them."""
    loader = torch.utils.data.DataLoader(_data(), batch_size=10)
    bad = {3, 17, 18, 64}
    m = _model()
    r = train_model_advanced(m, loader, None, _nan_at(bad), epochs=10, ema_decay=0.9, **PLAIN)
    assert r["skipped_steps"] == len(bad) and r["rollbacks"] == 0
    avg, n, _ = _hand(_model(), loader, 10, 0.9, bad_steps=bad)
    _assert_params(avg, r["averaged_weights"]["ema"])
    assert n == 100 - len(bad)


def test_the_ema_counter_is_the_number_of_good_steps():
    model = torch.nn.Linear(2, 1)
    ema = EMA(model, 0.99)
    for bad in [False, True, False, True, True, False]:
        ema.step(torch.tensor(bad))
    assert int(ema.count) == 3
    assert ema.count.dtype == torch.int64
    off = EMA(model, 0.99, skip_bad=False)  # recovery off: the optimizer steps anyway
    for bad in [False, True]:
        off.step(torch.tensor(bad))
    assert int(off.count) == 2


def test_an_ema_step_reads_nothing_to_the_host(monkeypatch):
    """Every host read a tensor offers raises: the EMA's step makes none (the guard's verdict
    stays on the device, so does the counter)."""
    ema = EMA(_model(), 0.999)

    def refuse(*args, **kwargs):
        raise AssertionError("host read in an EMA step")
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    for bad in (False, True, False):
        ema.step(torch.tensor(bad))
    monkeypatch.undo()
    assert int(ema.count) == 2


# ---------------------------------------------------------------- rollback
def test_a_rollback_restores_the_average_and_its_counter(monkeypatch):
    """A run of non-finite steps makes recovery roll back: the EMA (weights and counter) is
    the snapshot's afterwards, as the model is, though it had moved on since the snapshot."""
    seen = []
    restore = Recovery._restore

    def spy(self):
        snap = copy.deepcopy(self._snapshot)
        before = copy.deepcopy(self.parts[ck.EMA_KEY].state_dict())
        restore(self)
        seen.append((snap, before, copy.deepcopy(self.parts[ck.EMA_KEY].state_dict()),
                     copy.deepcopy(self.parts[ck.MODEL_KEY].state_dict())))

    monkeypatch.setattr(Recovery, "_restore", spy)
    loader = torch.utils.data.DataLoader(_data(), batch_size=10)
    r = train_model_advanced(_model(), loader, None, _nan_at(set(range(34, 41))), epochs=5,
                             ema_decay=0.9, recovery_check_every=10, rollback_after=5, **PLAIN)
    assert r["rollbacks"] == 1 and len(seen) == 1
    snap, before, after, model = seen[0]
    assert int(after["count"]) == int(snap[ck.EMA_KEY]["count"]) < int(before["count"])
    for k, v in snap[ck.EMA_KEY]["weights"].items():
        if k in dict(_model().named_parameters()):
            assert torch.equal(after["weights"][k], v), k
            assert not torch.equal(before["weights"][k], v), k
    for k, v in snap[ck.MODEL_KEY].items():
        assert torch.equal(model[k], v), k


# ---------------------------------------------------------------- eval_ema and the best epoch
def test_eval_ema_validates_the_hand_ema_and_checkpoints_hold_the_live_weights(tmp_path):
    loader = torch.utils.data.DataLoader(_data(), batch_size=10)
    val = torch.utils.data.DataLoader(_data(40, seed=3), batch_size=16)
    m = _model()
    r = train_model_advanced(m, loader, val, CE, epochs=4, ema_decay=0.9, eval_ema=True,
                             checkpoint_dir=tmp_path, model_name="e", **PLAIN)
    _, _, per_epoch = _hand(hand := _model(), loader, 4, 0.9)
    assert [row["epoch"] for row in r["history"]] == [1, 2, 3, 4]
    for row, weights in zip(r["history"], per_epoch):
        ema = copy.deepcopy(hand).eval()
        ema.load_state_dict(weights)  # the hand EMA, the live buffers at the epoch's end
        hand_loss = torch.zeros((), dtype=torch.float64)
        with torch.no_grad():
            for x, y in val:
                hand_loss += CE(ema(x), y) * len(y)
        assert row["val_loss"] == pytest.approx(float(hand_loss) / 40, rel=1e-12, abs=0)
    saved = load_checkpoint(tmp_path / "e_last.pt")
    for k, v in m.state_dict().items():  # restore_best_weights=False: m holds the live weights
        assert torch.equal(saved[ck.MODEL_KEY][k], v), k
    _assert_params(per_epoch[-1], saved[ck.EMA_KEY]["weights"])
    assert int(saved[ck.EMA_KEY]["count"]) == 40
    best = load_checkpoint(tmp_path / "e_best.pt")
    assert best[ck.BEST_KEY]["weights"] == r["best_weights"] == "ema"


def test_restore_best_weights_with_eval_ema_ends_with_the_best_epochs_average(tmp_path):
    loader = torch.utils.data.DataLoader(_data(), batch_size=10)
    val = torch.utils.data.DataLoader(_data(40, seed=3), batch_size=16)
    m = _model()
    r = train_model_advanced(m, loader, val, CE, epochs=3, ema_decay=0.9, eval_ema=True,
                             checkpoint_dir=tmp_path, model_name="b",
                             **{**PLAIN, "restore_best_weights": True})
    best = load_checkpoint(tmp_path / "b_best.pt")
    assert r["best_weights"] == "ema" and best[ck.EPOCH_KEY] == r["best_epoch"] >= 1
    for k, v in m.state_dict().items():
        assert torch.equal(best[ck.EMA_KEY]["weights"][k], v), k
    # resumed after the end, the run restores the same averaged weights from _best.pt
    m2 = _model(5)
    train_model_advanced(m2, loader, val, CE, epochs=3, ema_decay=0.9, eval_ema=True,
                         checkpoint_dir=tmp_path, model_name="b", resume=True,
                         **{**PLAIN, "restore_best_weights": True})
    for k, v in m.state_dict().items():
        assert torch.equal(m2.state_dict()[k], v), k


# ---------------------------------------------------------------- SWA
def test_recompute_bn_equals_torch_update_bn():
    data = _data(64)
    loader = torch.utils.data.DataLoader(data, batch_size=10)
    a, b = _model(1), _model(1)
    a[1].momentum = b[1].momentum = 0.3
    a.eval()
    recompute_bn(a, (x for x, _ in loader))
    torch.optim.swa_utils.update_bn(loader, b)
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), k
    assert a[1].momentum == 0.3


def test_swa_equals_a_hand_equal_average_with_update_bn(monkeypatch):
    """swa_start=3 of 6 epochs: the SWA weights are the equal average of the epoch-end weights
    of epochs 3..6, and their BatchNorm statistics are update_bn's over the training data."""
    ends = []
    end_epoch = SWA.end_epoch

    def spy(self, epoch):
        ends.append({k: v.detach().clone() for k, v in self.live.named_parameters()})
        end_epoch(self, epoch)

    monkeypatch.setattr(SWA, "end_epoch", spy)
    loader = torch.utils.data.DataLoader(_data(), batch_size=10)
    m = _model()
    r = train_model_advanced(m, loader, None, CE, epochs=6, swa_start=3, **PLAIN)
    swa = r["averaged_weights"]["swa"]
    hand = {k: sum(e[k] for e in ends[2:]) / 4 for k in ends[0]}
    _assert_params(hand, swa, exact=False)
    ref = _model(9)
    ref.load_state_dict({**dict(ref.state_dict()), **hand})
    torch.optim.swa_utils.update_bn(loader, ref)
    for k, v in ref.named_buffers():
        assert torch.allclose(swa[k], v, rtol=0, atol=1e-12), k
    assert not torch.allclose(swa["1.running_mean"], m[1].running_mean)


@pytest.mark.parametrize("own_generator", [False, True], ids=["global_rng", "generator"])
def test_swa_and_ema_leave_the_training_run_untouched(own_generator):
    """Dropout, a shuffled loader (drawing from the global RNG, or from its own generator) and
    BatchNorm: with SWA's batch-norm pass every epoch and an EMA, the live model trains exactly
    as without them (data order and random draws untouched)."""
    def run(**extra):
        g = torch.Generator().manual_seed(3) if own_generator else None
        loader = torch.utils.data.DataLoader(_data(), batch_size=10, shuffle=True, generator=g)
        m = _model(dropout=0.3)
        r = train_model_advanced(m, loader, None, CE, epochs=3, seed=0, **PLAIN, **extra)
        return m, r
    plain, _ = run()
    averaged, r = run(swa_start=1, ema_decay=0.9)
    for (k, a), (_, b) in zip(plain.state_dict().items(), averaged.state_dict().items()):
        assert torch.equal(a, b), k
    assert set(r["averaged_weights"]) == {"ema", "swa"}


@pytest.mark.parametrize("scheduler_type, crash_at", [("cosine", 25), ("onecycle", 37)])
def test_mid_epoch_resume_with_averages_and_a_scheduler_is_bit_exact(tmp_path, scheduler_type,
                                                                     crash_at):
    """EMA + SWA (from epoch 2) + eval_ema, a scheduler, step checkpoints: a crash in epoch 3
    (after SWA began) and a resume end with the same live weights, averages, counters and
    history as the uninterrupted run (Lightning #11665 crashed resuming SWA with a scheduler)."""
    opts = {**PLAIN, "use_scheduler": True, "scheduler_type": scheduler_type, "epochs": 4,
            "ema_decay": 0.9, "swa_start": 2, "eval_ema": True, "checkpoint_every_n_steps": 1,
            "seed": 0, "model_name": "m"}
    val = torch.utils.data.DataLoader(_data(30, seed=4), batch_size=16)

    def loader():
        return torch.utils.data.DataLoader(_data(), batch_size=10, shuffle=True)
    ref = _model(dropout=0.2)
    r_ref = train_model_advanced(ref, loader(), val, CE, checkpoint_dir=tmp_path / "ref", **opts)
    with pytest.raises(Boom):
        train_model_advanced(_model(dropout=0.2), loader(), val, crashing(crash_at),
                             checkpoint_dir=tmp_path / "c", **opts)
    resumed = _model(7, dropout=0.2)
    r = train_model_advanced(resumed, loader(), val, CE, checkpoint_dir=tmp_path / "c",
                             resume=True, **opts)
    for k, v in ref.state_dict().items():
        assert torch.equal(resumed.state_dict()[k], v), k
    for kind in ("ema", "swa"):
        for k, v in r_ref["averaged_weights"][kind].items():
            assert torch.equal(r["averaged_weights"][kind][k], v), (kind, k)
    a, b = (load_checkpoint(d / "m_last.pt") for d in (tmp_path / "ref", tmp_path / "c"))
    assert torch.equal(a[ck.EMA_KEY]["count"], b[ck.EMA_KEY]["count"])
    assert a[ck.SWA_KEY]["count"] == b[ck.SWA_KEY]["count"] == 3
    strip = lambda h: [{k: v for k, v in e.items() if k != "seconds"} for e in h]  # noqa: E731
    assert strip(r["history"]) == strip(r_ref["history"])


# ---------------------------------------------------------------- off, and the options
def test_off_the_averages_are_no_ops_saved_as_none():
    off = NoAverage()
    assert off.step(torch.tensor(True)) is None and off.module() is None
    assert off.state_dict() is None and off.holds == "model"


@pytest.mark.parametrize("bad, error, match", [
    ({"ema_decay": 1.0}, ValueError, r"ema_decay must be in \(0, 1\), got 1.0"),
    ({"ema_decay": 0}, ValueError, r"ema_decay must be in \(0, 1\), got 0"),
    ({"ema_decay": "0.9"}, TypeError, r"ema_decay"),
    ({"swa_start": 0}, ValueError, r"swa_start must be >= 1, got 0"),
    ({"swa_start": 4, "epochs": 3}, ValueError,
     r"swa_start must be an epoch of the run, 1 to epochs=3 .*got 4"),
    ({"eval_ema": True}, ValueError, r"eval_ema=True .* needs ema_decay= .* or swa_start="),
    ({"ema_warmup": 1}, TypeError, r"ema_warmup must be a bool, got 1"),
    ({"eval_ema": "yes"}, TypeError, r"eval_ema must be a bool, got 'yes'"),
])
def test_bad_averaging_options_are_refused_naming_them(bad, error, match):
    with pytest.raises(error, match=match):
        TrainConfig.from_options(**bad)

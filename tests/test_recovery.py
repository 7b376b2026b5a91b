"""Divergence recovery: NaN/Inf injection, loss spikes, rollbacks, diagnosed stops."""

import copy
import math
import random

import pytest
import torch

from _helpers import Boom, crashing, make_data, make_model
from advanced_training_utils import (
    LearningRateScheduler,
    load_checkpoint,
    train_model_advanced,
)
from advanced_training_utils.checkpoint import MODEL_KEY, OPTIMIZER_KEY, SCHEDULER_KEY
from advanced_training_utils.engine.health.guard import StepGuard
from advanced_training_utils.engine.health.recovery import Recovery, TrainingDivergedError
from advanced_training_utils.engine.parts import NoSchedule

CE = torch.nn.CrossEntropyLoss()
F = (12,)


def _loaders():
    return (torch.utils.data.DataLoader(make_data(512, features=F), batch_size=16, shuffle=True),
            torch.utils.data.DataLoader(make_data(256, seed=9, features=F), batch_size=64))


class Injector:
    """Poisons chosen training batches' inputs and chosen steps' gradients with NaN/Inf."""

    def __init__(self, model, input_steps, grad_steps, value):
        self.calls, self.input_steps, self.grad_steps, self.value = 0, input_steps, grad_steps, value
        model[1].weight.register_hook(self._grad)
        self.model = model

    def _grad(self, g):
        return g * self.value if self.calls in self.grad_steps else g

    def __call__(self, out, y):
        return CE(out, y)

    def forward_pre(self, module, args):
        if module.training:
            self.calls += 1
            if self.calls in self.input_steps:
                return (args[0] * self.value,)
        return None


def _run(seed, recovery, value):
    tl, vl = _loaders()
    model = make_model(1, features=F)
    rng = random.Random(seed)
    steps = rng.sample(range(1, 32 * 6), 6)
    inj = Injector(model, set(steps[:3]), set(steps[3:]), value)
    model.register_forward_pre_hook(inj.forward_pre)
    res = train_model_advanced(model, tl, vl, inj, epochs=6, learning_rate=3e-3, device="cpu",
                               verbose=False, seed=0, recovery=recovery, use_scheduler=False,
                               restore_best_weights=False)
    return res, model


@pytest.fixture(scope="module")
def clean():
    tl, vl = _loaders()
    model = make_model(1, features=F)
    res = train_model_advanced(model, tl, vl, CE, epochs=6, learning_rate=3e-3, device="cpu",
                               verbose=False, seed=0, use_scheduler=False,
                               restore_best_weights=False)
    return res["history"][-1]["val_loss"]


@pytest.mark.parametrize("seed, value", [(0, math.nan), (1, math.inf), (2, math.nan),
                                         (3, -math.inf), (4, math.nan)])
def test_injected_nan_inf_runs_finish_close_to_clean(seed, value, clean):
    res, model = _run(seed, True, value)
    final = res["history"][-1]["val_loss"]
    assert math.isfinite(final) and abs(final - clean) / clean < 0.05
    assert res["skipped_steps"] == 6
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("seed, value", [(0, math.nan), (3, -math.inf)])
def test_same_runs_without_recovery_end_non_finite(seed, value):
    res, model = _run(seed, False, value)
    assert not math.isfinite(res["history"][-1]["val_loss"])
    assert not all(torch.isfinite(p).all() for p in model.parameters())


def test_lr_100x_too_high_rolls_back_once_and_converges(tmp_path):
    """Deterministic (seed 0, CPU): the loss explodes in epoch 2, recovery rolls back once at
    its end (batch 32 of 32) with the LR x0.1, and the run then trains to its best in epoch 3."""
    tl, vl = _loaders()
    model = make_model(1, features=F)
    sgd = lambda p: torch.optim.SGD(p, lr=5.0, momentum=0.9)  # noqa: E731 (0.05 trains well)
    res = train_model_advanced(model, tl, vl, CE, epochs=8, learning_rate=5.0, optimizer=sgd,
                               device="cpu", verbose=False, seed=0, use_scheduler=False,
                               rollback_lr_factor=0.1, checkpoint_dir=tmp_path)
    assert res["rollbacks"] == 1 and res["epochs_run"] == 8 and not res["stopped_early"]
    (event,) = res["recovery_events"]
    assert {k: event[k] for k in ("kind", "epoch", "batch", "lr")} == {
        "kind": "rollback", "epoch": 2, "batch": 32, "lr": 0.5}
    assert event["detail"].startswith("median loss ")
    assert event["detail"].endswith("restored the last good snapshot, lr x0.1")
    assert [h["lr"] for h in res["history"]] == [5.0] + [0.5] * 7
    assert [h["epoch"] for h in res["history"] if "recovery_event" in h] == [2]
    assert res["history"][1]["recovery_event"] == event["detail"]
    assert res["best_epoch"] == 3
    assert res["best_val_loss"] == res["history"][2]["val_loss"] < res["history"][0]["val_loss"]
    best = load_checkpoint(tmp_path / "model_best.pt")["model"]
    assert all(torch.isfinite(v).all() for v in best.values())


def test_rollbacks_used_up_raise_with_diagnosis():
    tl, vl = _loaders()
    model = make_model(1, features=F)

    calls = [0]

    def always_nan_after(out, y):
        calls[0] += 1
        loss = CE(out, y)
        return loss * math.nan if calls[0] > 40 else loss

    with pytest.raises(TrainingDivergedError, match="after 1 rollback") as e:
        train_model_advanced(model, tl, vl, always_nan_after, epochs=6, device="cpu",
                             verbose=False, seed=0, max_rollbacks=1, use_scheduler=False)
    d = e.value.diagnosis
    assert d["rollbacks"] == 1 and len(d["bad_batches"]) > 0
    assert d["bad_batches"][0][0] == 2  # epoch 2 (batches 41.. of 32-batch epochs)
    assert "1.weight" in d["first_nonfinite_params"]
    assert len(d["lr_history"]) >= 2


def test_loss_spike_is_skipped():
    tl, vl = _loaders()
    model = make_model(1, features=F)
    calls = [0]

    def spiky(out, y):
        calls[0] += 1
        loss = CE(out, y)
        return loss * 1000.0 if calls[0] == 50 else loss

    res = train_model_advanced(model, tl, vl, spiky, epochs=2, device="cpu", verbose=False,
                               seed=0, spike_factor=10.0, use_scheduler=False)
    assert res["history"][1]["spike_steps"] == 1 and res["skipped_steps"] == 1
    res = train_model_advanced(make_model(1, features=F), tl, vl, spiky, epochs=2, device="cpu",
                               verbose=False, seed=0, spike_factor=None, use_scheduler=False)
    assert res["skipped_steps"] == 0


# ------------------------------------------------------------------ rollback after a resume
def _diverging_run(tmp_path, criterion, check_every, **extra):
    """SGD at a 100x too high LR: recovery rolls back (at epoch ends or every 3 steps)."""
    tl = torch.utils.data.DataLoader(make_data(128, features=F), batch_size=16, shuffle=True)
    vl = torch.utils.data.DataLoader(make_data(64, seed=9, features=F), batch_size=64)
    model = make_model(1, features=F) if not extra.get("resume") else make_model(5, features=F)
    res = train_model_advanced(
        model, tl, vl, criterion, epochs=4, learning_rate=5.0, device="cpu", verbose=False,
        seed=0, use_scheduler=False, restore_best_weights=False, model_name="m",
        optimizer=lambda p: torch.optim.SGD(p, lr=5.0, momentum=0.9), rollback_lr_factor=0.1,
        max_rollbacks=5, recovery_check_every=check_every, checkpoint_every_n_steps=1,
        checkpoint_dir=tmp_path, **extra)
    return model, res


@pytest.mark.parametrize("check_every, crash_at", [(None, 5), (None, 20), (3, 12), (3, 20)])
def test_rollback_after_a_mid_epoch_resume_is_bit_exact(tmp_path, check_every, crash_at):
    """The rollback after a resume restores the saved run's last good snapshot, not the state
    at the resume point (which no check has cleared). Criterion calls: 8 train + 1 val per
    epoch, so every crash point is mid-epoch, before a rollback of the reference run."""
    ref, r_ref = _diverging_run(tmp_path / "ref", CE, check_every)
    assert r_ref["rollbacks"] >= 1
    with pytest.raises(Boom):
        _diverging_run(tmp_path / "c", crashing(crash_at, CE), check_every)
    resumed, res = _diverging_run(tmp_path / "c", CE, check_every, resume=True)
    for a, b in zip(ref.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert res["recovery_events"] == r_ref["recovery_events"]


def _nan_in_epoch_3(first_call):
    """NaN losses for the last 20 training steps of epoch 3 (call ``first_call`` is its first
    batch; 32 batches per epoch)."""
    calls = [0]

    def crit(out, y):
        calls[0] += 1
        loss = CE(out, y)
        return loss * math.nan if first_call + 12 <= calls[0] < first_call + 32 else loss
    return crit


def test_rollback_to_a_snapshot_stored_without_weights(tmp_path):
    """An epoch-end checkpoint right after a clean check stores its snapshot without a second
    copy of the weights (they are the checkpoint's own); a rollback after resuming from it
    restores the same state as an uninterrupted run."""
    tl, vl = _loaders()  # 32 training + 4 validation calls per epoch
    opts = dict(device="cpu", verbose=False, seed=0, model_name="m", restore_best_weights=False)
    ref = make_model(1, features=F)
    r_ref = train_model_advanced(ref, tl, vl, _nan_in_epoch_3(2 * 36 + 1), epochs=4,
                                 checkpoint_dir=tmp_path / "ref", **opts)
    assert [e["epoch"] for e in r_ref["recovery_events"]] == [3]
    train_model_advanced(make_model(1, features=F), tl, vl, CE, epochs=2,
                         checkpoint_dir=tmp_path / "c", **opts)
    state = load_checkpoint(tmp_path / "c" / "m_last.pt")
    snap = state["recovery"]["snapshot"]
    assert snap["model"] is None and snap["optimizer"]["state"] is None
    resumed = make_model(5, features=F)
    res = train_model_advanced(resumed, tl, vl, _nan_in_epoch_3(1), epochs=4, resume=True,
                               checkpoint_dir=tmp_path / "c", **opts)
    for a, b in zip(ref.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert res["recovery_events"] == r_ref["recovery_events"]


def test_mid_epoch_checkpoint_stores_the_snapshot_weights(tmp_path):
    """A mid-epoch checkpoint holds the last good snapshot's weights (here the initial ones:
    no check has run yet), not the weights at the checkpoint."""
    tl, vl = _loaders()
    with pytest.raises(Boom):
        train_model_advanced(make_model(1, features=F), tl, vl, crashing(10, CE), epochs=1, device="cpu",
                             verbose=False, seed=0, checkpoint_dir=tmp_path, model_name="m",
                             checkpoint_every_n_steps=1)
    state = load_checkpoint(tmp_path / "m_last.pt")
    snap = state["recovery"]["snapshot"]
    assert state["step_in_epoch"] == 9
    for k, v in make_model(1, features=F).state_dict().items():
        assert torch.equal(snap["model"][k], v)
        assert not torch.equal(state["model"][k], v)


# ------------------------------------------------------------------ Recovery on its own
class _Steps:
    """What the checks below need of a run: a tiny model with SGD + momentum (its buffers
    change in place at every step) and an optional scheduler."""

    def __init__(self, scheduler_type=None):
        torch.manual_seed(0)
        self.model = torch.nn.Linear(4, 2)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9)
        self.scheduler = (LearningRateScheduler(self.optimizer, scheduler_type, T_max=10,
                                                step_size=1) if scheduler_type
                          else NoSchedule(self.optimizer))
        self.guard = StepGuard(self.optimizer)

    def recovery(self, rollback_after=5, lr_factor=0.5, max_rollbacks=3):
        table = {MODEL_KEY: self.model, OPTIMIZER_KEY: self.optimizer,
                 SCHEDULER_KEY: self.scheduler}
        return Recovery(table, self.model, self.optimizer, self.scheduler, self.guard,
                        rollback_after=rollback_after, lr_factor=lr_factor,
                        max_rollbacks=max_rollbacks, divergence_factor=3.0)


def _steps(parts, n):
    for _ in range(n):
        parts.optimizer.zero_grad()
        parts.model(torch.randn(8, 4)).pow(2).mean().backward()
        parts.optimizer.step()
        parts.scheduler.step()


GOOD, BAD = [1.0, 1.0, 0.0, 0.0], [math.nan, math.nan, 1.0, 0.0]


def _check(recovery, good, bad):
    """A check after ``good`` good then ``bad`` bad steps (the run of bad steps at the end)."""
    rows = [GOOD] * good + [BAD] * bad
    return recovery.after_check(rows, len(rows), float(bad), epoch=1, first_batch=0,
                                lr_history=[])


@pytest.mark.parametrize("rollback_after", [1, 3, 5])
def test_rollback_after_counts_the_bad_run_inclusively(rollback_after):
    """``rollback_after`` consecutive bad steps, half the interval, roll back; one fewer does
    not."""
    rec = _Steps().recovery(rollback_after=rollback_after)
    rec.snapshot()
    assert _check(rec, rollback_after - 1, rollback_after - 1) is None
    assert rec.rollbacks == 0
    assert _check(rec, rollback_after, rollback_after) is not None
    assert rec.rollbacks == 1


@pytest.mark.parametrize("scheduler_type", [None, "cosine", "step"])
def test_every_rollback_restores_the_same_snapshot_and_compounds_the_lr_factor(scheduler_type):
    """Two rollbacks to one snapshot (no clean check in between): each restores the model and
    optimizer state of the snapshot exactly, although the steps in between changed the
    optimizer's buffers in place, and the LR is the snapshot's times lr_factor ** rollbacks."""
    parts = _Steps(scheduler_type)
    rec = parts.recovery(lr_factor=0.5, max_rollbacks=3)
    _steps(parts, 2)
    rec.snapshot()
    lr0 = parts.optimizer.param_groups[0]["lr"]
    want_model = copy.deepcopy(parts.model.state_dict())
    want_buffers = copy.deepcopy(parts.optimizer.state_dict()["state"])
    assert want_buffers  # momentum buffers exist
    for n in (1, 2):
        _steps(parts, 3)
        assert _check(rec, 0, 5) is not None
        for k, v in parts.model.state_dict().items():
            assert torch.equal(v, want_model[k]), (n, k)
        state = parts.optimizer.state_dict()["state"]
        for i, s in want_buffers.items():
            assert torch.equal(state[i]["momentum_buffer"], s["momentum_buffer"]), (n, i)
        assert parts.optimizer.param_groups[0]["lr"] == pytest.approx(lr0 * 0.5 ** n, rel=1e-12)

"""Divergence recovery: NaN/Inf injection, loss spikes, rollbacks, diagnosed stops."""

import math
import random

import pytest
import torch

from _helpers import make_data, make_model
from advanced_training_utils import load_checkpoint, train_model_advanced
from advanced_training_utils.recovery import TrainingDivergedError

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


def test_lr_100x_too_high_rolls_back_and_converges_or_stops(tmp_path):
    tl, vl = _loaders()
    model = make_model(1, features=F)
    sgd = lambda p: torch.optim.SGD(p, lr=5.0, momentum=0.9)  # noqa: E731 (0.05 trains well)
    try:
        res = train_model_advanced(model, tl, vl, CE, epochs=8, learning_rate=5.0, optimizer=sgd,
                                   device="cpu", verbose=False, seed=0, use_scheduler=False,
                                   rollback_lr_factor=0.1, checkpoint_dir=tmp_path)
    except TrainingDivergedError as e:  # an acceptable outcome, if diagnosed
        assert {"first_nonfinite_params", "lr_history", "grad_norm_history",
                "bad_batches"} <= set(e.diagnosis)
    else:
        assert res["rollbacks"] >= 1 and res["history"][-1]["lr"] < 5.0
        assert res["best_val_loss"] < res["history"][0]["val_loss"]
        assert "rollback" in res["recovery_events"][0]["kind"]
        assert any("recovery_event" in h for h in res["history"])
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

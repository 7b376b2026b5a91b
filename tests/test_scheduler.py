import math

import pytest
import torch
from torch.optim import lr_scheduler as tls

from advanced_training_utils import LearningRateScheduler

N = 120


def _opt(lr=0.1, groups=1):
    params = [torch.nn.Parameter(torch.zeros(2)) for _ in range(groups)]
    return torch.optim.SGD([{"params": [p], "lr": lr * (i + 1)} for i, p in enumerate(params)])


def _metric(i):
    # Plateaus at 1.0 for stretches so the plateau scheduler actually reduces.
    return 1.0 if i % 17 > 3 else 2.0 - i / N + (i % 17)


def _close(a, b, rel):
    a, b = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    return a.shape == b.shape and torch.allclose(a, b, rtol=rel, atol=0)


def _run(sched, opt, steps, plateau=False):
    out = []
    for i in range(steps):
        opt.step()
        sched.step(_metric(i)) if plateau else sched.step()
        out.append([g["lr"] for g in opt.param_groups])
    return out


CASES = {
    "plateau": (dict(patience=2, factor=0.5), lambda o: tls.ReduceLROnPlateau(o, factor=0.5, patience=2)),
    "cosine": (dict(T_max=30), lambda o: tls.CosineAnnealingLR(o, T_max=30)),
    "step": (dict(step_size=7, gamma=0.8), lambda o: tls.StepLR(o, step_size=7, gamma=0.8)),
    "exp": (dict(gamma=0.97), lambda o: tls.ExponentialLR(o, gamma=0.97)),
    "onecycle": (dict(max_lr=1.0, total_steps=N + 5),
                 lambda o: tls.OneCycleLR(o, max_lr=1.0, total_steps=N + 5)),
}


@pytest.mark.parametrize("kind", list(CASES))
def test_matches_torch_step_by_step(kind):
    kw, ref_factory = CASES[kind]
    o1, o2 = _opt(groups=2), _opt(groups=2)
    ours = LearningRateScheduler(o1, kind, **kw)
    ref = ref_factory(o2)
    got = _run(ours, o1, N, plateau=kind == "plateau")
    want = _run(ref, o2, N, plateau=kind == "plateau")
    assert _close(got, want, 1e-12)
    assert ours.get_last_lr() == [g["lr"] for g in o2.param_groups]
    if kind == "plateau":
        assert min(x[0] for x in got) < 0.1  # it did reduce


@pytest.mark.parametrize("kind", ["cosine", "step", "exp"])
def test_warmup_matches_torch_sequential(kind):
    kw, ref_factory = CASES[kind]
    w = 8
    o1, o2 = _opt(), _opt()
    ours = LearningRateScheduler(o1, kind, warmup_steps=w, **kw)
    warm = tls.LinearLR(o2, start_factor=1 / (w + 1), end_factor=1.0, total_iters=w)
    ref = tls.SequentialLR(o2, [warm, ref_factory(o2)], milestones=[w])
    assert o1.param_groups[0]["lr"] == pytest.approx(o2.param_groups[0]["lr"])
    got = _run(ours, o1, N)
    want = _run(ref, o2, N)
    assert _close(got, want, 1e-9)


def test_warmup_onecycle_and_plateau_by_hand():
    w = 5
    o = _opt(lr=0.1)
    s = LearningRateScheduler(o, "onecycle", max_lr=1.0, total_steps=50, warmup_steps=w)
    o_ref = _opt(lr=0.1)
    ref = tls.OneCycleLR(o_ref, max_lr=1.0, total_steps=50)
    start = o_ref.param_groups[0]["lr"]  # 1.0 / 25
    seq = [o.param_groups[0]["lr"]]
    for _ in range(w + 10):
        s.step()
        seq.append(o.param_groups[0]["lr"])
    ramp = [start * (k + 1) / (w + 1) for k in range(w)] + [start]
    assert seq[: w + 1] == pytest.approx(ramp)
    ref_seq = [start]
    for _ in range(10):
        ref.step()
        ref_seq.append(o_ref.param_groups[0]["lr"])
    assert seq[w:] == pytest.approx(ref_seq)

    o = _opt(lr=0.1)
    s = LearningRateScheduler(o, "plateau", patience=0, factor=0.5, warmup_steps=3)
    lrs = []
    for _ in range(5):
        s.step(1.0)  # constant metric: after warmup, first call sets best, next reduces
        lrs.append(o.param_groups[0]["lr"])
    assert lrs == pytest.approx([0.1 * 2 / 4, 0.1 * 3 / 4, 0.1, 0.1, 0.05])


def test_state_dict_round_trip_into_fresh_object():
    for kind, (kw, _) in CASES.items():
        o1 = _opt()
        s1 = LearningRateScheduler(o1, kind, warmup_steps=4, **kw)
        _run(s1, o1, 30, plateau=kind == "plateau")
        o_state, s_state = o1.state_dict(), s1.state_dict()
        o2 = _opt()
        s2 = LearningRateScheduler(o2, kind, warmup_steps=4, **kw)
        o2.load_state_dict(o_state)
        s2.load_state_dict(s_state)
        a = _run(s1, o1, 40, plateau=kind == "plateau")
        b = _run(s2, o2, 40, plateau=kind == "plateau")
        assert a == b, kind


def test_interval_and_get_lr():
    o = _opt()
    assert LearningRateScheduler(o, "onecycle", total_steps=10).interval == "batch"
    for kind in ("plateau", "cosine", "step", "exp"):
        s = LearningRateScheduler(_opt(), kind)
        assert s.interval == "epoch"
        assert isinstance(s.get_lr(), float)
    assert LearningRateScheduler(_opt(), "cosine", interval="batch").interval == "batch"


def test_step_uses_gamma_then_factor():
    o = _opt(lr=1.0)
    s = LearningRateScheduler(o, "step", step_size=1, factor=0.3)
    o.step()
    s.step()
    assert s.get_lr() == pytest.approx(0.3)
    o = _opt(lr=1.0)
    s = LearningRateScheduler(o, "step", step_size=1, factor=0.3, gamma=0.9)
    o.step()
    s.step()
    assert s.get_lr() == pytest.approx(0.9)


def test_onecycle_epochs_times_steps():
    o = _opt()
    s = LearningRateScheduler(o, "onecycle", epochs=3, steps_per_epoch=7)
    assert s.total_steps == 21


def test_plateau_requires_metric():
    s = LearningRateScheduler(_opt(), "plateau")
    with pytest.raises(ValueError, match="metric is required for scheduler_type='plateau'"):
        s.step()
    with pytest.raises(ValueError, match="metric must be finite"):
        s.step(math.nan)
    s.step(torch.tensor(0.5))  # a 0-d tensor is accepted


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(scheduler_type="linear"), ValueError,
         "scheduler_type must be one of 'plateau', 'cosine', 'step', 'exp', 'onecycle'; got 'linear'"),
        (dict(scheduler_type=3), TypeError, "scheduler_type must be a str"),
        (dict(scheduler_type="plateau", patience=-1), ValueError, "patience must be >= 0, got -1"),
        (dict(scheduler_type="plateau", factor=1.5), ValueError, r"factor must be in \(0, 1\), got 1.5"),
        (dict(scheduler_type="cosine", T_max=0), ValueError, "T_max must be >= 1, got 0"),
        (dict(scheduler_type="exp", gamma=0.0), ValueError, r"gamma must be in \(0, 1\], got 0.0"),
        (dict(scheduler_type="step", step_size=2.5), TypeError, "step_size must be an integer"),
        (dict(scheduler_type="onecycle"), ValueError, "onecycle needs total_steps"),
        (dict(scheduler_type="onecycle", total_steps=10, max_lr=-1.0), ValueError,
         "max_lr must be > 0, got -1.0"),
        (dict(scheduler_type="cosine", warmup_steps=-2), ValueError, "warmup_steps must be >= 0"),
        (dict(scheduler_type="cosine", interval="week"), ValueError, "interval must be one of"),
    ],
)
def test_rejects_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        LearningRateScheduler(_opt(), **kwargs)


def test_rejects_non_optimizer():
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        LearningRateScheduler([1, 2], "cosine")


def test_onecycle_holds_final_lr_past_horizon_and_keeps_saved_horizon(caplog):
    o = _opt()
    s = LearningRateScheduler(o, "onecycle", total_steps=5)
    for _ in range(4):
        o.step()
        s.step()
    final = s.get_lr()
    for _ in range(3):
        s.step()
    assert s.get_lr() == final and s.step_count == 7
    o2 = _opt()
    s2 = LearningRateScheduler(o2, "onecycle", total_steps=50)
    s2.load_state_dict(s.state_dict())
    assert s2.total_steps == 5 and "keeps its horizon of 5 steps" in caplog.text

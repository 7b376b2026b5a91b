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
    # cosine fits in the steps left after warmup: torch's cosine over T_max - w.
    main = tls.CosineAnnealingLR(o2, T_max=30 - w) if kind == "cosine" else ref_factory(o2)
    ref = tls.SequentialLR(o2, [warm, main], milestones=[w])
    assert o1.param_groups[0]["lr"] == pytest.approx(o2.param_groups[0]["lr"])
    n = 30 if kind == "cosine" else N  # past T_max torch's cosine climbs back up
    got = _run(ours, o1, n)
    want = _run(ref, o2, n)
    assert _close(got, want, 1e-9)


# ---- the whole LR curve against closed-form formulas written here (not torch's schedulers)
BASE = [0.1, 0.2]  # two param groups (see _opt)


def _ramp(base, k, w):
    """Linear warmup: base / (w + 1) at k=0 up to base at k=w."""
    return base * (k + 1) / (w + 1)


def _cos(start, end, pct):
    return end + (start - end) * (1 + math.cos(math.pi * pct)) / 2


def _ref_cosine(base, k, w, t_max=12, eta=0.01):
    return _ramp(base, k, w) if k < w else _cos(base, eta, (k - w) / (t_max - w))


def _ref_step(base, k, w, size=3, gamma=0.5):
    return _ramp(base, k, w) if k < w else base * gamma ** ((k - w) // size)


def _ref_exp(base, k, w, gamma=0.8):
    return _ramp(base, k, w) if k < w else base * gamma ** (k - w)


def _ref_onecycle(max_lr, k, w, total=40, div=25.0, final_div=1e4, linear=False):
    anneal = (lambda a, b, pct: a + (b - a) * pct) if linear else _cos
    initial = max_lr / div
    final = initial / final_div
    peak = w if w else 0.3 * total - 1  # the step at which the LR is max_lr
    k = min(k, total - 1)  # past the horizon the final LR holds
    if k <= peak:
        return anneal(initial, max_lr, k / peak)
    return anneal(max_lr, final, (k - peak) / (total - 1 - peak))


def _ref_plateau(base, metrics, w, factor=0.5, patience=2, threshold=1e-4):
    """ReduceLROnPlateau (mode min, relative threshold) by hand; warmup ignores the metric."""
    lrs, lr, best, bad = [_ramp(base, 0, w) if w else base], base, math.inf, 0
    for k, m in enumerate(metrics, start=1):
        if k < w:
            lrs.append(_ramp(base, k, w))
            continue
        if k > w:
            if m < best * (1 - threshold):
                best, bad = m, 0
            else:
                bad += 1
            if bad > patience:
                new = lr * factor
                lr = new if lr - new > 1e-8 else lr
                bad = 0
        lrs.append(lr)
    return lrs


CURVES = {  # kind: (options, steps to run, reference of (base or max_lr, k, w))
    "cosine": (dict(T_max=12, min_lr=0.01), 12, _ref_cosine),
    "step": (dict(step_size=3, gamma=0.5), 20, _ref_step),
    "exp": (dict(gamma=0.8), 20, _ref_exp),
    "onecycle": (dict(max_lr=[1.0, 2.0], total_steps=40), 43, _ref_onecycle),
    "onecycle_linear": (dict(max_lr=[1.0, 2.0], total_steps=40, anneal_strategy="linear",
                             div_factor=10.0, final_div_factor=100.0), 43,
                        lambda m, k, w: _ref_onecycle(m, k, w, div=10.0, final_div=100.0,
                                                      linear=True)),
}


@pytest.mark.parametrize("w", [0, 1, 5])
@pytest.mark.parametrize("kind", list(CURVES) + ["plateau"])
def test_whole_curve_matches_hand_computation(kind, w):
    o = _opt(groups=2)
    metrics = [_metric(i) for i in range(45)]
    if kind == "plateau":
        s = LearningRateScheduler(o, kind, patience=2, factor=0.5, warmup_steps=w)
        want = [_ref_plateau(b, metrics, w) for b in BASE]
        steps = len(metrics)
    else:
        kw, steps, ref = CURVES[kind]
        s = LearningRateScheduler(o, kind.split("_")[0], warmup_steps=w, **kw)
        bases = kw.get("max_lr", BASE)
        want = [[ref(b, k, w) for k in range(steps + 1)] for b in bases]
    got = [[g["lr"] for g in o.param_groups]]
    for i in range(steps):
        o.step()
        s.step(metrics[i])
        got.append([g["lr"] for g in o.param_groups])
    got = torch.tensor(got, dtype=torch.float64).T
    assert torch.allclose(got, torch.tensor(want, dtype=torch.float64), rtol=1e-10, atol=1e-15)
    if kind == "plateau":
        assert got[0].min() < BASE[0] / 4  # it did reduce
    if kind == "cosine":  # exactly min_lr after T_max calls, warmup or not
        assert got[:, 12].tolist() == [0.01, 0.01]
    if kind.startswith("onecycle"):
        div, fdiv = (10.0, 100.0) if kind == "onecycle_linear" else (25.0, 1e4)
        final = [m / div / fdiv for m in (1.0, 2.0)]
        held = torch.tensor([[final[0]] * 5, [final[1]] * 5], dtype=torch.float64)
        if kind == "onecycle":  # the cosine anneal ends exactly on it
            assert torch.equal(got[:, 39:], held)  # reached after total_steps - 1, then held
        else:  # torch's linear form start + (end - start) * 1 rounds in the last bit
            assert torch.allclose(got[:, 39:], held, rtol=1e-14, atol=0)
        if w:  # one rise, to max_lr exactly after w calls, then one fall
            assert got[0, w].item() == pytest.approx(1.0, rel=1e-12)
            rise, fall = got[0, : w + 1], got[0, w:40]
            assert (rise.diff() > 0).all() and (fall.diff() < 0).all()


def test_warmup_onecycle_rises_once_and_plateau_by_hand():
    # onecycle: warmup_steps is the length of its own rise (it used to add a second rise).
    w = 5
    o = _opt(lr=0.1)
    s = LearningRateScheduler(o, "onecycle", max_lr=1.0, total_steps=50, warmup_steps=w)
    seq = [o.param_groups[0]["lr"]]
    for _ in range(49):
        s.step()
        seq.append(o.param_groups[0]["lr"])
    assert seq[0] == pytest.approx(1.0 / 25)  # onecycle's own start, max_lr / div_factor
    assert max(seq) == pytest.approx(1.0) and seq.index(max(seq)) == w
    assert seq[-1] == pytest.approx(1.0 / 25 / 1e4, rel=1e-12)

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
        (dict(scheduler_type="cosine", T_max=5, warmup_steps=5), ValueError,
         r"warmup_steps must be < T_max for scheduler_type='cosine' .*got warmup_steps=5, "
         r"T_max=5; both count step\(\) calls \(interval 'epoch'\)"),
        (dict(scheduler_type="onecycle", total_steps=10, warmup_steps=9), ValueError,
         "warmup_steps must be <= total_steps - 2 = 8 for scheduler_type='onecycle'.*got 9"),
        (dict(scheduler_type="onecycle", total_steps=10, warmup_steps=3, pct_start=0.4), ValueError,
         "give pct_start or warmup_steps for scheduler_type='onecycle', not both "
         r"\(got pct_start=0.4, warmup_steps=3\)"),
        (dict(scheduler_type="onecycle", total_steps=10, warmup_steps=3, warmup_start_factor=0.5),
         ValueError, "warmup_start_factor does not apply to scheduler_type='onecycle', got 0.5"),
        (dict(scheduler_type="onecycle", total_steps=10, pct_start=1.0), ValueError,
         r"pct_start must be in \(0, 1\), got 1.0"),
        (dict(scheduler_type="onecycle", total_steps=10, max_lr=[1.0, 2.0]), ValueError,
         r"max_lr must have one value per param group \(1\), got 2: \[1.0, 2.0\]"),
    ],
)
def test_rejects_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        LearningRateScheduler(_opt(), **kwargs)


@pytest.mark.parametrize("w", [0, 3])
def test_plateau_mode_max_equals_torchs_reduce_lr_on_plateau(w):
    """mode='max' (a monitored UAR, say): a rising value is an improvement; the same LRs as
    torch's own ReduceLROnPlateau(mode='max') after the warmup."""
    values = [0.3, 0.5, 0.5, 0.49, 0.6, 0.6, 0.6, 0.61, 0.2, 0.2, 0.2, 0.7]
    ours_opt, ref_opt = _opt(), _opt()
    ours = LearningRateScheduler(ours_opt, "plateau", mode="max", patience=1, factor=0.5,
                                 warmup_steps=w)
    ref = torch.optim.lr_scheduler.ReduceLROnPlateau(ref_opt, mode="max", patience=1,
                                                     factor=0.5, threshold=1e-4)
    got, want = [], []
    for k, v in enumerate(values, start=1):
        ours.step(v)
        got.append(ours_opt.param_groups[0]["lr"])
        if k > w:  # warmup ignores the metric
            ref.step(v)
            want.append(ref_opt.param_groups[0]["lr"])
    assert got[w:] == pytest.approx(want, rel=1e-12)
    assert len(set(want)) > 2  # it reduced at least twice
    with pytest.raises(ValueError, match="mode must be one of 'min', 'max'; got 'maximum'"):
        LearningRateScheduler(_opt(), "plateau", mode="maximum")


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


class _RecordingSGD(torch.optim.SGD):
    """SGD that records the first group's LR at every optimizer step."""

    def __init__(self, params, lr):
        super().__init__(params, lr=lr, momentum=0.9)
        self.seen = []

    def step(self, closure=None):
        self.seen.append(self.param_groups[0]["lr"])
        return super().step(closure)


@pytest.mark.parametrize("w", [0, 1, 3])
def test_train_model_advanced_gets_the_whole_curve(w):
    """Through TrainConfig.scheduler_options: warmup counts epochs for cosine (T_max defaults to
    epochs) and optimizer steps for onecycle (total = epochs * optimizer steps per epoch)."""
    from _helpers import make_loaders, make_model
    from advanced_training_utils import train_model_advanced

    tl, vl = make_loaders(n=96, batch_size=16)  # 6 batches
    ce = torch.nn.CrossEntropyLoss()
    quiet = dict(verbose=False, device="cpu", recovery=False, gradient_clip=None)
    opts = []
    res = train_model_advanced(
        make_model(1), tl, vl, ce, epochs=5, learning_rate=0.1, scheduler_type="cosine",
        warmup_steps=w, optimizer=lambda p: opts.append(_RecordingSGD(p, 0.1)) or opts[-1],
        **quiet)
    # Epoch e trains with the LR after e - 1 epoch steps; the history holds the LR after e.
    assert opts[0].seen == pytest.approx(
        [_ref_cosine(0.1, e, w, t_max=5, eta=0.0) for e in range(5) for _ in range(6)], rel=1e-12)
    assert [h["lr"] for h in res["history"]] == pytest.approx(
        [_ref_cosine(0.1, e, w, t_max=5, eta=0.0) for e in range(1, 6)], rel=1e-12)
    assert res["history"][-1]["lr"] == 0.0  # min_lr, exactly, at the end of the run

    opts = []
    res = train_model_advanced(
        make_model(1), tl, vl, ce, epochs=3, learning_rate=0.1, scheduler_type="onecycle",
        max_lr=0.5, accumulation_steps=2, warmup_steps=w,
        optimizer=lambda p: opts.append(_RecordingSGD(p, 0.1)) or opts[-1], **quiet)
    total = 3 * 3  # 6 batches / accumulation 2 = 3 optimizer steps per epoch
    assert opts[0].seen == pytest.approx(
        [_ref_onecycle(0.5, k, w, total=total) for k in range(total)], rel=1e-12)
    assert res["history"][-1]["lr"] == 0.5 / 25 / 1e4  # its final LR, exactly


def test_warmup_may_take_all_but_the_last_step():
    o = _opt(lr=0.1)
    s = LearningRateScheduler(o, "cosine", T_max=4, warmup_steps=3, min_lr=0.01)
    lrs = []
    for _ in range(4):
        s.step()
        lrs.append(o.param_groups[0]["lr"])
    assert lrs == pytest.approx([0.05, 0.075, 0.1, 0.01]) and lrs[-1] == 0.01
    o = _opt(lr=0.1)
    s = LearningRateScheduler(o, "onecycle", max_lr=1.0, total_steps=5, warmup_steps=3)
    lrs = [o.param_groups[0]["lr"]]
    for _ in range(4):
        s.step()
        lrs.append(o.param_groups[0]["lr"])
    assert lrs[3] == pytest.approx(1.0) and lrs[4] == 1.0 / 25 / 1e4


_METRIC_RULE = "metric must be a real number or a one-element tensor"


@pytest.mark.parametrize(
    "metric, exc, match",
    [
        ("0.5", TypeError, f"{_METRIC_RULE}, got '0.5' of type str"),
        ([0.5], TypeError, f"{_METRIC_RULE}, got \\[0.5\\] of type list"),
        (True, TypeError, f"{_METRIC_RULE}, got True of type bool"),
        (object(), TypeError, "of type object"),
        (torch.tensor([0.5, 0.6]), ValueError, r"got a tensor of shape \(2,\)"),
        (torch.zeros(0), ValueError, r"got a tensor of shape \(0,\)"),
    ],
)
@pytest.mark.parametrize("kind", ["plateau", "cosine", "onecycle"])
def test_step_rejects_bad_metric_types(kind, metric, exc, match):
    s = LearningRateScheduler(_opt(), kind, total_steps=10)
    with pytest.raises(exc, match=match):
        s.step(metric)
    assert s.step_count == 0  # rejected before the schedule moved


@pytest.mark.parametrize("metric", [0.5, 1, torch.tensor(0.5), torch.tensor([0.5])])
def test_step_accepts_numbers_and_one_element_tensors(metric):
    s = LearningRateScheduler(_opt(), "plateau")
    s.step(metric)
    assert s.step_count == 1


@pytest.mark.parametrize(
    "state, exc, match",
    [
        (None, TypeError,
         "state must be a dict from LearningRateScheduler.state_dict\\(\\), got NoneType"),
        ("abc", TypeError, "got str"),
        ({"scheduler_type": "cosine"}, ValueError,
         "state is missing step_count, warmup_steps, start_lrs, scheduler"),
        ({**LearningRateScheduler(_opt(), "step").state_dict()}, ValueError,
         "state_dict is for scheduler_type='step', this scheduler is 'cosine'"),
    ],
)
def test_load_state_dict_rejects_bad_state(state, exc, match):
    with pytest.raises(exc, match=match):
        LearningRateScheduler(_opt(), "cosine").load_state_dict(state)


@pytest.mark.parametrize("w", [0, 3])
@pytest.mark.parametrize("kind", list(CASES))
def test_scale_lr_scales_the_rest_of_the_curve(kind, w):
    """A rollback's ``scale_lr(f)`` mid-run: every later LR is the unscaled run's times f, for
    every type, warmup or not, and past the cosine horizon (T_max=30 here, 60 steps)."""
    def curve(scale_at=None):
        o = _opt(groups=2)
        s = LearningRateScheduler(o, kind, warmup_steps=w, **CASES[kind][0])
        out = []
        for i in range(60):
            if i == scale_at:
                s.scale_lr(0.5)
            o.step()
            s.step(_metric(i)) if kind == "plateau" else s.step()
            out.append([g["lr"] for g in o.param_groups])
        return out

    plain, scaled = curve(), curve(scale_at=10)
    assert scaled[:10] == plain[:10]
    assert _close(scaled[10:], [[lr * 0.5 for lr in row] for row in plain[10:]], rel=1e-12)


@pytest.mark.parametrize("kind,opts", [("cosine", {"T_max": 10, "min_lr": 0.05}),
                                       ("cosine", {"T_max": 10, "min_lr": 0.05,
                                                   "warmup_steps": 2}),
                                       ("plateau", {"patience": 0, "factor": 0.5,
                                                    "min_lr": 0.04})])
def test_scale_lr_scales_the_floor_too(kind, opts):
    """After scale_lr(f) the rest of the curve is f x the unscaled one, floor included (the
    cosine's eta_min used to lift a rolled-back LR back up to min_lr)."""
    def make(lr, scale):
        w = torch.nn.Parameter(torch.zeros(1))
        o = {k: v * scale if k == "min_lr" else v for k, v in opts.items()}
        return LearningRateScheduler(torch.optim.SGD([w], lr=lr), kind, **o)

    a, b = make(0.1, 1.0), make(0.01, 0.1)
    for t in range(10):
        if t == 3:
            a.scale_lr(0.1)
        if t >= 3:
            assert a.get_lr() == pytest.approx(b.get_lr(), rel=1e-12), t
        for s in (a, b):
            s.step(1.0) if kind == "plateau" else s.step()

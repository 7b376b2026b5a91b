import copy
import inspect
import json
import math
import threading

import pytest
import torch

from _helpers import make_data, make_loaders, make_model
from advanced_training_utils import load_checkpoint, train_model_advanced
from advanced_training_utils.checkpoint import PRECISION_KEY, SCHEDULER_KEY
from advanced_training_utils.engine.run import infer_modality
from enhanced_training_function import train_model_advanced as guide_import

CE = torch.nn.CrossEntropyLoss()
QUIET = dict(verbose=False, device="cpu")


def test_guide_import_path_is_the_same_function():
    assert guide_import is train_model_advanced


def _hand_loop(model, tl, vl, epochs, lr, clip, seed, accumulation=1):
    """The same math written out by hand: fused AdamW, cosine per epoch, clip_grad_norm_."""
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, fused=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    for _ in range(epochs):
        model.train()
        for i, (x, y) in enumerate(tl):
            if i % accumulation == 0:
                opt.zero_grad(set_to_none=True)
            (CE(model(x), y) / accumulation).backward()
            if i % accumulation == accumulation - 1:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                opt.step()
        model.eval()
        with torch.no_grad():
            for x, y in vl:
                CE(model(x), y)
        sched.step()
    return model


def test_matches_hand_written_loop():
    tl, vl = make_loaders()
    ours, ref = make_model(1), make_model(1)
    train_model_advanced(ours, tl, vl, CE, epochs=4, learning_rate=3e-3, seed=7,
                         scheduler_type="cosine", gradient_clip=0.5, restore_best_weights=False,
                         **QUIET)
    _hand_loop(ref, tl, vl, epochs=4, lr=3e-3, clip=0.5, seed=7)
    for a, b in zip(ours.parameters(), ref.parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-6)
    assert any(not torch.equal(a, b) for a, b in zip(ours.parameters(), make_model(1).parameters()))


def test_gradient_accumulation_equals_big_batch():
    data = make_data(64)
    small = torch.utils.data.DataLoader(data, batch_size=8)
    big = torch.utils.data.DataLoader(data, batch_size=32)
    a, b = make_model(2), make_model(2)
    common = dict(epochs=2, learning_rate=1e-2, use_scheduler=False, gradient_clip=None,
                  restore_best_weights=False, seed=0, **QUIET)
    ra = train_model_advanced(a, small, None, CE, accumulation_steps=4, **common)
    rb = train_model_advanced(b, big, None, CE, **common)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.allclose(pa, pb, rtol=1e-5, atol=1e-6)
    assert ra["history"][-1]["train_loss"] == pytest.approx(rb["history"][-1]["train_loss"], rel=1e-5)


class _Overflow:
    """CE loss, times 1e30 on one chosen call, to force an fp16 gradient overflow."""

    def __init__(self, at):
        self.at, self.calls = at, 0

    def __call__(self, out, y):
        self.calls += 1
        loss = CE(out, y)
        return loss * 1e30 if self.calls == self.at else loss


def test_fp16_overflow_skips_step_and_scheduler_and_lowers_scale(tmp_path):
    tl, vl = make_loaders(n=64, batch_size=16, shuffle=False)  # 4 steps per epoch
    model = make_model(3)
    res = train_model_advanced(
        model, tl, vl, _Overflow(at=3), epochs=2, learning_rate=1e-3, use_mixed_precision=True,
        amp_dtype="float16", scheduler_type="onecycle", gradient_clip=1.0,
        checkpoint_dir=tmp_path, model_name="amp", restore_best_weights=False, **QUIET)
    h = res["history"]
    assert h[0]["skipped_steps"] == 1 and h[1]["skipped_steps"] == 0
    assert res["skipped_steps"] == 1
    state = load_checkpoint(tmp_path / "amp_last.pt")
    assert state[PRECISION_KEY]["scaler"]["scale"] == 2.0**15  # halved once, not grown
    assert state[SCHEDULER_KEY]["step_count"] == 8 - 1  # the skipped step did not advance it
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert math.isfinite(h[-1]["val_loss"])

    # Clipping saw unscaled norms: close to an fp32 run's, not 2**16 times larger.
    fp16 = train_model_advanced(make_model(4), tl, vl, CE, epochs=1, use_mixed_precision=True,
                                amp_dtype="float16", use_scheduler=False, **QUIET)
    fp32 = train_model_advanced(make_model(4), tl, vl, CE, epochs=1, use_scheduler=False, **QUIET)
    assert fp16["history"][0]["grad_norm_mean"] == pytest.approx(
        fp32["history"][0]["grad_norm_mean"], rel=2e-2)


def test_nonfinite_loss_skips_step_in_fp32():
    tl, vl = make_loaders(n=64, batch_size=16, shuffle=False)

    calls = [0]

    def nan_once(out, y):
        calls[0] += 1
        loss = CE(out, y)
        return loss * math.nan if calls[0] == 2 else loss

    model = make_model(5)
    res = train_model_advanced(model, tl, vl, nan_once, epochs=2, use_scheduler=False, **QUIET)
    assert res["history"][0]["skipped_steps"] == 1
    assert res["history"][0]["nonfinite_train_examples"] == 16
    assert math.isfinite(res["history"][0]["train_loss"])
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_nonfused_optimizer_also_skips():
    tl, vl = make_loaders(n=64, batch_size=16, shuffle=False)
    model = make_model(5)
    calls = [0]

    def inf_once(out, y):
        calls[0] += 1
        return CE(out, y) * (math.inf if calls[0] == 1 else 1.0)

    before = copy.deepcopy(model.state_dict())
    res = train_model_advanced(model, tl, None, inf_once, epochs=1, use_scheduler=False,
                               optimizer=lambda p: torch.optim.SGD(p, lr=0.0), **QUIET)
    assert res["skipped_steps"] == 1
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_resume_after_normal_stop_equals_uninterrupted(tmp_path):
    tl, vl = make_loaders()
    opts = dict(learning_rate=5e-3, seed=3, scheduler_type="plateau", plateau_patience=1,
                use_augmentation=True, augment="emotion", augment_options={"noise_level": 0.1},
                early_stop_patience=20, model_name="r", **QUIET)
    full = make_model(6)
    r_full = train_model_advanced(full, tl, vl, CE, epochs=6, checkpoint_dir=tmp_path / "a", **opts)

    part = make_model(6)
    train_model_advanced(part, tl, vl, CE, epochs=3, checkpoint_dir=tmp_path / "b", **opts)
    resumed = make_model(99)  # different init: everything must come from the checkpoint
    r_res = train_model_advanced(resumed, tl, vl, CE, epochs=6, checkpoint_dir=tmp_path / "b",
                                 resume=True, **opts)
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    strip = lambda h: [{k: v for k, v in e.items() if k != "seconds"} for e in h]  # noqa: E731
    assert strip(r_res["history"]) == strip(r_full["history"])
    assert r_res["best_epoch"] == r_full["best_epoch"]
    for name in ("r_best.pt", "r_last.pt"):
        obj = torch.load(tmp_path / "b" / name, weights_only=True)
        assert obj["epoch"] >= 1 and "model" in obj and "optimizer" in obj
    lines = (tmp_path / "b" / "r_metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2, 3, 4, 5, 6]


def test_resume_finished_run_returns_at_once(tmp_path):
    tl, vl = make_loaders()
    m = make_model(6)
    train_model_advanced(m, tl, vl, CE, epochs=2, checkpoint_dir=tmp_path, **QUIET)
    m2 = make_model(8)
    res = train_model_advanced(m2, tl, vl, CE, epochs=2, checkpoint_dir=tmp_path, resume=True,
                               **QUIET)
    assert res["epochs_run"] == 2
    for a, b in zip(m.parameters(), m2.parameters()):
        assert torch.equal(a, b)


def test_early_stopping_and_best_weights_restored(tmp_path):
    tl, vl = make_loaders()
    model = make_model(7)
    res = train_model_advanced(model, tl, vl, CE, epochs=50, learning_rate=0.3,
                               use_scheduler=False, early_stop_patience=2, min_delta=1e-3,
                               checkpoint_dir=tmp_path, model_name="es", **QUIET)
    assert res["stopped_early"] and res["epochs_run"] < 50
    assert res["epochs_run"] == res["best_epoch"] + 2
    best = load_checkpoint(tmp_path / "es_best.pt")
    for k, v in model.state_dict().items():
        assert torch.equal(v, best["model"][k])
    assert best["epoch"] == res["best_epoch"]
    assert res["best_val_loss"] == pytest.approx(res["history"][res["best_epoch"] - 1]["val_loss"])


def test_onecycle_horizon_and_cosine_default(tmp_path):
    tl, vl = make_loaders(n=96, batch_size=16)  # 6 batches
    model = make_model(1)
    train_model_advanced(model, tl, vl, CE, epochs=3, scheduler_type="onecycle",
                         accumulation_steps=2, checkpoint_dir=tmp_path, model_name="o", **QUIET)
    s = load_checkpoint(tmp_path / "o_last.pt")[SCHEDULER_KEY]
    assert s["scheduler"]["total_steps"] == 3 * 3 and s["step_count"] == 9
    train_model_advanced(make_model(1), tl, vl, CE, epochs=4, scheduler_type="cosine",
                         checkpoint_dir=tmp_path, model_name="c", **QUIET)
    s = load_checkpoint(tmp_path / "c_last.pt")[SCHEDULER_KEY]
    assert s["scheduler"]["T_max"] == 4 and s["step_count"] == 4


def test_plateau_steps_on_validation_loss():
    tl, vl = make_loaders()
    res = train_model_advanced(make_model(1), tl, vl, CE, epochs=8, learning_rate=1e-7,
                               scheduler_type="plateau", plateau_patience=0, factor=0.5, **QUIET)
    # With a tiny LR the val loss barely moves; patience 0 and threshold 1e-4 halve the LR.
    lrs = [h["lr"] for h in res["history"]]
    assert lrs[-1] < lrs[0]


def test_metrics_and_history_keys():
    tl, vl = make_loaders()
    res = train_model_advanced(make_model(1), tl, vl, CE, epochs=2, metrics=["accuracy"], **QUIET)
    keys = {"epoch", "train_loss", "val_loss", "val_accuracy", "lr", "grad_norm_mean",
            "grad_norm_max", "clip_fraction", "skipped_steps", "seconds"}
    assert keys <= set(res["history"][0])
    assert 0 <= res["history"][0]["val_accuracy"] <= 1
    for k in ("best_val_loss", "best_epoch", "history", "stopped_early", "epochs_run",
              "best_checkpoint", "last_checkpoint", "grad_stats", "stability"):
        assert k in res


def test_augmentation_touches_training_batches_only():
    seen = {"train": 0}

    def aug(x):
        seen["train"] += 1
        return x + 0.0

    tl, vl = make_loaders(n=64, batch_size=16)
    train_model_advanced(make_model(1), tl, vl, CE, epochs=2, use_augmentation=True,
                         augment=aug, **QUIET)
    assert seen["train"] == 2 * 4


@pytest.mark.parametrize("shape, modality", [((4, 64, 100), "audio"), ((4, 1, 64, 100), "audio"),
                                             ((4, 128), "notes"), ((4, 3), "emotion")])
def test_modality_rule(shape, modality):
    assert infer_modality(torch.zeros(shape)) == modality


@pytest.mark.parametrize("features", [(128,), (3,), (4, 16)])
def test_augmentation_is_never_guessed_from_the_shape(features, caplog):
    """use_augmentation=True without augment=: the same weights as no augmentation and a
    WARNING; [B, 128] real-valued inputs are not clamped to [0, 1] as note probabilities."""
    g = torch.Generator().manual_seed(0)
    x = 5 * torch.randn(64, *features, generator=g)
    y = x.flatten(1)[:, :2].tanh()
    tl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    mse = torch.nn.MSELoss()

    def run(**kw):
        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(x[0].numel(), 2))
        train_model_advanced(model, tl, None, mse, epochs=2, seed=0, use_scheduler=False,
                             restore_best_weights=False, **QUIET, **kw)
        return model.state_dict()

    plain = run(use_augmentation=False)
    with caplog.at_level("WARNING", logger="advanced_training_utils"):
        asked = run(use_augmentation=True)
    assert all(torch.equal(plain[k], asked[k]) for k in plain)
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"
              and "training WITHOUT augmentation" in r.getMessage()]
    assert len(warned) == 1 and f"augment={infer_modality(x)!r}" in warned[0]
    explicit = run(use_augmentation=True, augment=infer_modality(x))
    assert not all(torch.equal(plain[k], explicit[k]) for k in plain)  # applied when named


def test_stability_checks_every_n_and_on_nonfinite():
    tl, vl = make_loaders(n=64, batch_size=16)
    res = train_model_advanced(make_model(1), tl, vl, CE, epochs=4, check_stability=True,
                               stability_every=2, **QUIET)
    assert [("stability_healthy" in h) for h in res["history"]] == [False, True, False, True]
    assert res["stability"]["epoch"] == 4 and res["stability"]["gradients"]["healthy"]


def _spike_or_nan_at(call, kind):
    """CE whose ``call``-th training loss is x1000 (a finite spike) or NaN."""
    calls = [0]

    def crit(out, y):
        loss = CE(out, y)
        if torch.is_grad_enabled():
            calls[0] += 1
            if calls[0] == call:
                return loss * (1000.0 if kind == "spike" else math.nan)
        return loss
    return crit


@pytest.mark.parametrize("kind", ["spike", "nan"])
def test_stability_check_runs_on_an_epoch_with_a_skipped_step(kind):
    """Besides every ``stability_every`` epochs, the check runs at the end of an epoch with a
    skipped step: a spike (finite loss, no non-finite example) or a NaN loss."""
    tl, vl = make_loaders(n=512, batch_size=16)  # 32 steps per epoch: room for a spike window
    res = train_model_advanced(make_model(1), tl, vl, _spike_or_nan_at(32 + 25, kind), epochs=3,
                               check_stability=True, stability_every=10, use_scheduler=False,
                               seed=0, **QUIET)
    assert [h["skipped_steps"] for h in res["history"]] == [0, 1, 0]
    assert [h["nonfinite_train_examples"] for h in res["history"]] == [
        0, 16 if kind == "nan" else 0, 0]
    assert [("stability_healthy" in h) for h in res["history"]] == [False, True, False]
    assert res["stability"]["epoch"] == 2


# ---------------------------------------------------------------- host syncs
_CONVERSIONS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy")


def _count_package_conversions(monkeypatch, run, only_in_steps=True, phase="train_epoch"):
    """Count tensor-to-host conversions whose caller is our package; with ``only_in_steps``,
    only while ``phase`` runs (``train_epoch``: the training steps, ``evaluate``: the validation
    batches; epoch-end reads are outside both)."""
    import advanced_training_utils.engine.run as train_mod

    counts = {"n": 0, "inside": not only_in_steps, "epochs": 0}
    real_epoch = getattr(train_mod, phase)

    def wrapped(*a, **k):
        counts["inside"], counts["epochs"] = True, counts["epochs"] + 1
        try:
            return real_epoch(*a, **k)
        finally:
            counts["inside"] = not only_in_steps

    monkeypatch.setattr(train_mod, phase, wrapped)
    for name in _CONVERSIONS:
        orig = getattr(torch.Tensor, name)

        def spy(self, *a, _orig=orig, **k):
            caller = inspect.currentframe().f_back
            # The training thread only: the checkpoint writer thread is not a training step.
            if counts["inside"] and threading.current_thread() is threading.main_thread() and (
                    caller.f_globals.get("__name__", "").startswith("advanced_training_utils")):
                counts["n"] += 1
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, spy)
    try:
        run()
    finally:
        monkeypatch.undo()
    return counts["n"], counts["epochs"]


@pytest.mark.parametrize("extra", [
    dict(),
    dict(use_mixed_precision=True, amp_dtype="float16"),
    dict(use_mixed_precision=True, amp_dtype="bfloat16", use_augmentation=True,
         augment="emotion", check_stability=True, metrics="accuracy", spike_factor=5.0),
    dict(mixup_alpha=0.4, cutmix_alpha=1.0, label_smoothing=0.1, use_augmentation=True,
         augment="emotion"),
])
def test_no_host_conversions_in_training_steps(monkeypatch, tmp_path, extra):
    """Zero conversions by our package in every training step (all features on, checkpoints
    every epoch); the spy does see the epoch-end reads, so it can fail."""
    tl, vl = make_loaders(n=128, batch_size=8)

    def run():
        train_model_advanced(make_model(1), tl, vl, CE, epochs=2, checkpoint_dir=tmp_path,
                             gradient_clip=1.0, **QUIET, **extra)

    in_steps, epochs = _count_package_conversions(monkeypatch, run)
    assert epochs == 2 and in_steps == 0
    everywhere, _ = _count_package_conversions(monkeypatch, run, only_in_steps=False)
    assert everywhere > 0


@pytest.mark.parametrize("metrics", [["uar", "macro_f1", "accuracy", "per_class_recall"],
                                     ["ccc", "mae"]])
def test_evaluate_makes_no_host_read_per_batch_with_builtin_metrics(monkeypatch, metrics):
    """The metrics' statistics stay on the device during validation; they are read with the
    epoch's other numbers (the spy sees that read: it can fail)."""
    if metrics == ["ccc", "mae"]:
        data = make_data(96)
        x = data.tensors[0]
        reg = torch.utils.data.TensorDataset(x, x.flatten(1)[:, :3])
        tl = torch.utils.data.DataLoader(reg, batch_size=16)
        vl = torch.utils.data.DataLoader(reg, batch_size=10)
        crit = torch.nn.MSELoss()
    else:
        tl, vl = make_loaders(n=96, batch_size=10)
        crit = CE

    def run():
        res = train_model_advanced(make_model(1), tl, vl, crit, epochs=2, metrics=metrics,
                                   **QUIET)
        assert f"val_{metrics[0]}" in res["history"][-1]

    in_eval, epochs = _count_package_conversions(monkeypatch, run, phase="evaluate")
    assert epochs == 2 and in_eval == 0
    everywhere, _ = _count_package_conversions(monkeypatch, run, only_in_steps=False,
                                               phase="evaluate")
    assert everywhere > 0


def test_nonfused_optimizer_reads_one_flag_per_step(monkeypatch):
    tl, _ = make_loaders(n=64, batch_size=8)

    def run():
        train_model_advanced(make_model(1), tl, None, CE, epochs=1, use_scheduler=False,
                             optimizer=lambda p: torch.optim.SGD(p, lr=0.1), **QUIET)

    in_steps, _ = _count_package_conversions(monkeypatch, run)
    assert in_steps == 8  # one documented read per optimizer step


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(epochs=0), ValueError, "epochs must be >= 1, got 0"),
    (dict(learning_rate=-1.0), ValueError, "learning_rate must be > 0"),
    (dict(scheduler_type="cyclic"), ValueError, "scheduler_type must be one of"),
    (dict(gradient_clip=0.0), ValueError, "gradient_clip must be > 0"),
    (dict(accumulation_steps=0), ValueError, "accumulation_steps must be >= 1"),
    (dict(augment="video", use_augmentation=True), ValueError, "augment must be one of 'audio'"),
    (dict(early_stop_patience=0), ValueError, "early_stop_patience must be >= 1"),
    (dict(learning_rat=1e-3), TypeError, "unknown option\\(s\\) 'learning_rat'; valid options: epochs"),
    (dict(device="tpu"), ValueError, "device must be 'auto', 'cpu', 'cuda'"),
    (dict(verbose="yes"), TypeError, "verbose must be a bool"),
])
def test_rejects_bad_options(kwargs, exc, match):
    tl, vl = make_loaders(n=16)
    with pytest.raises(exc, match=match):
        train_model_advanced(make_model(1), tl, vl, CE, **{"verbose": False, **kwargs})


def test_rejects_bad_objects():
    tl, vl = make_loaders(n=16)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        train_model_advanced("model", tl, vl, CE)
    with pytest.raises(TypeError, match="criterion must be callable"):
        train_model_advanced(make_model(1), tl, vl, None)
    with pytest.raises(ValueError, match="train_loader is empty"):
        train_model_advanced(make_model(1), [], vl, CE, verbose=False)
    with pytest.raises(ValueError, match="model has no trainable parameters"):
        train_model_advanced(torch.nn.Flatten(), tl, vl, CE, verbose=False)
    other = make_model(2)
    with pytest.raises(ValueError, match="optimizer holds 4 parameter\\(s\\) that are not the model's"):
        train_model_advanced(make_model(1), tl, vl, CE, verbose=False,
                             optimizer=torch.optim.SGD(other.parameters(), lr=0.1))


# ---------------------------------------------------------------- found by a new user's code
def test_without_recovery_a_nan_step_is_applied_and_not_reported_as_skipped():
    torch.manual_seed(0)
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    loader = [(x, y)]
    model = torch.nn.Linear(4, 2)
    nan_loss = lambda o, t: torch.nn.functional.cross_entropy(o, t) * math.nan  # noqa: E731
    r = train_model_advanced(model, loader, None, nan_loss, epochs=1, recovery=False,
                             optimizer=lambda p: torch.optim.SGD(p, lr=0.1), device="cpu",
                             verbose=False, restore_best_weights=False, check_stability=False)
    assert not torch.isfinite(model.weight).all()  # applied: recovery=False guards nothing
    assert r["skipped_steps"] == 0 and r["history"][0]["skipped_steps"] == 0


def test_a_one_shot_val_loader_is_refused_up_front():
    tl, vl = make_loaders(n=32, batch_size=16)
    with pytest.raises(TypeError, match="val_loader must be re-iterable once per epoch"):
        train_model_advanced(make_model(), tl, (b for b in vl), torch.nn.CrossEntropyLoss(),
                             epochs=2, device="cpu", verbose=False)


def test_a_model_name_too_long_for_a_file_name_is_refused_by_name():
    with pytest.raises(ValueError, match="model_name is 230 bytes long; at most 200"):
        train_model_advanced(make_model(), *make_loaders(n=32), torch.nn.CrossEntropyLoss(),
                             model_name="m" * 230, device="cpu", verbose=False)


def test_resume_with_nothing_to_resume_warns(tmp_path, caplog):
    tl, vl = make_loaders(n=32, batch_size=16)
    train_model_advanced(make_model(), tl, vl, torch.nn.CrossEntropyLoss(), epochs=1,
                         device="cpu", verbose=False, checkpoint_dir=tmp_path, resume=True)
    assert any(r.levelname == "WARNING" and "no checkpoint for 'model'" in r.message
               for r in caplog.records)

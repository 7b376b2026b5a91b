"""The LR range test (engine/lrfind.py) and ``advtrain lr-find`` (app/lrfind.py)."""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from advanced_training_utils import checkpoint as ck
from advanced_training_utils.app.cli import main
from advanced_training_utils.app.lrfind import build_lr_find_figure
from advanced_training_utils.engine import distributed
from advanced_training_utils.engine.config import TrainConfig
from advanced_training_utils.engine.loop import train_epoch
from advanced_training_utils.engine.lrfind import (
    LRFindResult,
    LRFindSettings,
    find_lr,
    lr_range_test,
    lr_schedule,
    smooth,
    smooth_centered,
    steepest,
)
from advanced_training_utils.engine.parts import build_parts
from advanced_training_utils.engine.state import save_parts

CPU = torch.device("cpu")


# ---------------------------------------------------------------- helpers
def _data(n: int = 96, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return TensorDataset(x, y)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)  # BatchNorm buffers and Dropout (global RNG) are state too
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16),
                               torch.nn.ReLU(), torch.nn.Dropout(0.1), torch.nn.Linear(16, 3))


def _same(a, b, where: str = "") -> None:
    """Deep equality: tensors bit-exact (torch.equal), floats equal (NaN equal to NaN)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            _same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), where
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), where
    else:
        assert a == b, where


def _everything(parts) -> dict:
    """Every stateful part's state, this rank's state, the gradients and train/eval flags."""
    return copy.deepcopy({"table": save_parts(parts.table), "rank": parts.rank.state_dict(),
                          "grads": [p.grad for p in parts.model.parameters()],
                          "modes": [m.training for m in parts.model.modules()]})


def _order(loader) -> list[torch.Tensor]:
    return [y for _, y in loader]


SMALL = LRFindSettings(min_lr=1e-4, max_lr=1.0, num_steps=12, repeats=2)

CONFIGS = {
    "adamw-plateau-clip": dict(scheduler_type="plateau", gradient_clip=1.0),
    "sgd-onecycle-accum": dict(optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
                               scheduler_type="onecycle", accumulation_steps=2),
    "fp16-scaler": dict(use_mixed_precision=True, amp_dtype="float16", gradient_clip=0.5),
    "bf16-augment-balanced": dict(use_mixed_precision=True, amp_dtype="bfloat16",
                                  use_augmentation=True, augment="emotion",
                                  class_weights="balanced", early_stop_patience=3),
}


@pytest.mark.parametrize("own_generator", [False, True], ids=["global-rng", "generator"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_stateful_part_is_restored_bit_exact(name, own_generator):
    gen = torch.Generator().manual_seed(7) if own_generator else None
    loader = DataLoader(_data(), batch_size=16, shuffle=True, generator=gen)
    cfg = TrainConfig.from_options(device="cpu", seed=3, use_scheduler=True, **CONFIGS[name])
    parts = build_parts(_model(), loader, None, torch.nn.CrossEntropyLoss(), cfg, CPU,
                        distributed.DistContext())
    train_epoch(parts.steps, iter(parts.loader), n_batches=parts.n_batches)  # optimizer state
    before = _everything(parts)
    assert before["table"][ck.OPTIMIZER_KEY]["state"], "no optimizer state to compare"
    rng = ck.capture_rng(), gen.get_state() if gen is not None else None
    expected = _order(loader)           # the order the user's loader would yield now
    ck.restore_rng(rng[0])
    if gen is not None:
        gen.set_state(rng[1])
    res = lr_range_test(parts, SMALL, seed=5)
    assert all(len(x) > 3 for x in res.losses)       # the sweeps did train
    _same(_everything(parts), before)
    after = _order(loader)
    assert all(torch.equal(a, b) for a, b in zip(after, expected)) and len(after) == len(expected)


def test_find_lr_restores_the_users_model_optimizer_and_rngs():
    loader = DataLoader(_data(), batch_size=16, shuffle=True)
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = next(iter(loader))
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()                      # a user optimizer with state, and gradients left on
    weights, opt_state = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    grads = [p.grad.clone() for p in model.parameters()]
    rng = ck.capture_rng()
    res = find_lr(model, loader, None, torch.nn.CrossEntropyLoss(), min_lr=1e-4, max_lr=1.0,
                  num_steps=12, repeats=2, optimizer=opt, device="cpu")
    assert res.suggestion is not None
    _same(model.state_dict(), weights)
    _same(opt.state_dict(), opt_state)
    _same([p.grad for p in model.parameters()], grads)
    _same(ck.capture_rng(), rng)
    assert model.training


# ---------------------------------------------------------------- the sweep and the suggestion
def test_lr_schedule_and_smoothing_by_hand():
    assert lr_schedule(1e-3, 1.0, 4) == pytest.approx([1e-3, 1e-2, 1e-1, 1.0], rel=1e-12)
    # a1 = 0.5 -> 0.5 / 0.5; a2 = 0.25 + 1 -> 1.25 / 0.75; a3 = 0.625 + 1.5 -> 2.125 / 0.875
    assert smooth([1.0, 2.0, 3.0], 0.5) == pytest.approx([1.0, 1.25 / 0.75, 2.125 / 0.875])
    assert smooth([1.0, 2.0, 3.0], 0.0) == [1.0, 2.0, 3.0]
    # medians of [1,5] [1,5,2] [5,2,3] [2,3,100] [3,100]: 3 2 3 3 51.5; then the means of those
    assert smooth_centered([1, 5, 2, 3, 100], 1) == pytest.approx(
        [2.5, 8 / 3, 8 / 3, 57.5 / 3, 27.25])


class _LogLR(torch.optim.SGD):
    """SGD that records the LR and momentum of every step it takes."""

    seen: list[tuple[float, float]] = []

    def step(self, closure=None):
        _LogLR.seen.append((self.param_groups[0]["lr"], self.param_groups[0]["momentum"]))
        return super().step(closure)


def test_each_step_uses_the_exponential_lr_and_the_scheduler_is_not_stepped():
    _LogLR.seen = []
    loader = DataLoader(_data(), batch_size=16)
    model = _model()
    res = find_lr(model, loader, None, torch.nn.CrossEntropyLoss(), min_lr=1e-4, max_lr=1e-2,
                  num_steps=15, repeats=1, diverge_factor=1e9, device="cpu",
                  optimizer=lambda ps: _LogLR(ps, lr=0.5, momentum=0.9),
                  scheduler_type="onecycle")
    hand = [1e-4 * 100 ** (k / 14) for k in range(15)]
    assert res.stopped == ("max_lr",) and len(res.losses[0]) == 15
    assert [lr for lr, _ in _LogLR.seen] == pytest.approx(hand, rel=1e-12)
    # onecycle cycles the momentum when stepped: unstepped, it keeps its first value
    assert len({m for _, m in _LogLR.seen}) == 1


def test_steepest_descent_of_a_known_curve():
    lrs = lr_schedule(1e-5, 1.0, 101)
    u = np.log10(lrs)
    curve = list(2.0 - np.tanh(2.0 * (u + 2.5)) + np.where(u > -1, 3 * (u + 1) ** 2, 0))
    assert steepest(lrs, curve) == pytest.approx(10 ** -2.5, rel=0.13)   # one grid step
    assert steepest(lrs[:5], [1.0, 0.9, 0.8, 0.7, 0.6]) is not None
    assert steepest(lrs, [1.0 + k for k in range(50)]) is None        # never falls


def test_divergence_stops_the_sweep():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 4, generator=g)
    loader = DataLoader(TensorDataset(x, x @ torch.ones(4, 1)), batch_size=16)
    kw = dict(min_lr=1e-4, num_steps=60, repeats=1, device="cpu",
              optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1))
    res = find_lr(torch.nn.Linear(4, 1), loader, None, torch.nn.MSELoss(), max_lr=100.0, **kw)
    n = len(res.losses[0])
    assert res.stopped[0] in ("diverged", "non-finite") and 10 < n < 60
    if res.stopped[0] == "diverged":    # the causal average crossed 4x its best at last
        ema = smooth(res.losses[0], 0.9)
        assert ema[-1] > 4.0 * min(ema[:-1])
        assert all(ema[k] <= 4.0 * min(ema[:k]) for k in range(1, n - 1))
    calm = find_lr(torch.nn.Linear(4, 1), loader, None, torch.nn.MSELoss(), max_lr=1e-2, **kw)
    assert calm.stopped == ("max_lr",) and len(calm.losses[0]) == 60


def test_the_suggestion_is_computed_before_the_restore_and_frozen():
    loader = DataLoader(_data(), batch_size=16, shuffle=True)
    model = _model()
    res = find_lr(model, loader, None, torch.nn.CrossEntropyLoss(), min_lr=1e-4, max_lr=10.0,
                  num_steps=40, repeats=3, device="cpu", learning_rate=1e-3, seed=1)
    each = [steepest(list(res.lrs), list(s), skip=max(len(s) // 10, 4)) for s in res.smoothed]
    assert list(res.suggestions) == each and None not in each
    assert res.suggestion == pytest.approx(sorted(each)[1])            # median of three
    assert res.spread == (min(each), max(each))
    assert all(type(v) is float for v in (res.suggestion, *res.lrs, *res.losses[0]))
    with pytest.raises(dataclasses.FrozenInstanceError):
        res.suggestion = 1.0  # type: ignore[misc]
    doc = json.loads(res.to_json())
    assert doc["suggestion"] == res.suggestion and doc["lrs"][-1] == pytest.approx(10.0)
    assert len({tuple(x) for x in res.losses}) == 3       # each sweep its own data order


def test_settings_are_checked_with_named_messages():
    with pytest.raises(ValueError, match=r"max_lr must be > min_lr, got max_lr=0.1"):
        LRFindSettings(min_lr=1.0, max_lr=0.1)
    with pytest.raises(ValueError, match=r"num_steps must be >= 10, got 3"):
        LRFindSettings(num_steps=3)
    with pytest.raises(ValueError, match=r"repeats must be >= 1, got 0"):
        LRFindSettings(repeats=0)
    with pytest.raises(ValueError, match=r"smoothing must be"):
        LRFindSettings(smoothing=1.0)
    with pytest.raises(TypeError, match=r"unknown"):
        find_lr(_model(), DataLoader(_data()), None, torch.nn.CrossEntropyLoss(), bogus=1)


# ---------------------------------------------------------------- the built-in task
@pytest.fixture(scope="module")
def emotion():
    from advanced_training_utils.app.tasks import TASK_TRAIN_DEFAULTS, build_task
    from advanced_training_utils.engine.presets import get_preset

    task = build_task("emotion", 0, {"per_piece": 1})  # small: 8 batches an epoch
    opts = {**TASK_TRAIN_DEFAULTS["emotion"], **get_preset("stable"), "seed": 0,
            "verbose": False, "device": "cpu"}
    return task, opts


def _train_loss(model, loader, criterion) -> float:
    """The mean loss over the training set in eval mode (no augmentation)."""
    model.eval()
    with torch.no_grad():
        return float(sum(criterion(model(x), y) * len(y) for x, y in loader)
                     / len(loader.dataset))


def test_on_the_emotion_task_the_suggestion_trains_and_max_lr_does_not(emotion):
    from advanced_training_utils import train_model_advanced

    task, opts = emotion
    start = copy.deepcopy(task.model.state_dict())
    res = find_lr(task.model, task.train_loader, task.val_loader, task.criterion, min_lr=1e-4,
                  max_lr=10.0, num_steps=40, repeats=2, **opts)
    assert res.suggestion is not None
    _same(task.model.state_dict(), start)
    loss0 = _train_loss(task.model, task.train_loader, task.criterion)
    after = {}
    for lr in (res.suggestion, res.settings["max_lr"]):
        task.model.load_state_dict(start)
        train_model_advanced(task.model, task.train_loader, None, task.criterion,
                             **{**opts, "epochs": 3, "learning_rate": lr, "use_scheduler": False,
                                "recovery": False, "early_stop_patience": None,
                                "check_stability": False, "restore_best_weights": False})
        after[lr] = _train_loss(task.model, task.train_loader, task.criterion)
    task.model.load_state_dict(start)
    assert after[res.suggestion] < 0.95 * loss0, (loss0, after)
    worse = after[res.settings["max_lr"]]
    assert not (worse < loss0), (loss0, after)        # NaN counts as not decreased


# ---------------------------------------------------------------- the CLI and the plot
def test_cli_writes_the_json_and_the_png(tmp_path, capsys):
    out = tmp_path / "lr"
    assert main(["lr-find", "--task", "emotion", "--out", str(out), "--num-steps", "24",
                 "--repeats", "1", "--min-lr", "1e-4", "--max-lr", "10", "--device", "cpu",
                 "--set", "per_piece=1"]) == 0
    doc = json.loads((out / "lr_find.json").read_text())
    assert {"suggestion", "spread", "spread_ratio", "suggestions", "stopped", "lrs", "losses",
            "smoothed", "settings", "task", "preset", "options"} <= doc.keys()
    assert doc["task"] == "emotion" and doc["settings"]["num_steps"] == 24
    assert len(doc["lrs"]) == 24 and len(doc["losses"]) == 1
    assert doc["spread"] == [doc["suggestion"]] * 2 and doc["suggestions"] == [doc["suggestion"]]
    assert (out / "lr_find.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "suggested learning_rate" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--repeats", "0"], "--repeats must be >= 1, got 0"),
    (["--num-steps", "5"], "--num-steps must be >= 10, got 5"),
    (["--min-lr", "1", "--max-lr", "0.1"], "--max-lr must be > min_lr"),
    (["--min-lr", "-1"], "--min-lr must be > 0"),
    (["--set", "bogus=1"], "unknown option(s) bogus"),
    (["--preset", "nope"], "unknown preset 'nope'"),
    (["--set", "learning_rate=-1"], "learning_rate"),
])
def test_cli_bad_options_exit_2_before_any_work(tmp_path, capsys, argv, message, monkeypatch):
    import advanced_training_utils.app.lrfind as app

    monkeypatch.setattr(app, "_build", lambda *a: pytest.fail("built the task"))
    out = tmp_path / "lr"
    assert main(["lr-find", "--task", "emotion", "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and not out.exists()


def test_cli_out_must_be_a_folder(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert main(["lr-find", "--task", "emotion", "--out", str(f)]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_the_figure_marks_each_suggestion_and_the_median():
    lrs = tuple(lr_schedule(1e-4, 1.0, 20))
    curve = tuple(2.0 - k / 20 for k in range(20))
    res = LRFindResult(lrs=lrs, losses=(curve, curve), smoothed=(curve, curve),
                       suggestions=(1e-3, 1e-2), suggestion=10 ** -2.5, spread=(1e-3, 1e-2),
                       stopped=("max_lr", "max_lr"), settings={})
    ax = build_lr_find_figure(res).axes[0]
    assert ax.get_xscale() == "log"
    vlines = sorted(line.get_xdata()[0] for line in ax.get_lines() if len(line.get_xdata()) == 2
                    and line.get_xdata()[0] == line.get_xdata()[1])
    assert vlines == pytest.approx([1e-3, 10 ** -2.5, 1e-2])
    assert any("suggestion" in t.get_text() for t in ax.get_legend().get_texts())

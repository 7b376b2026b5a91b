"""The engine's epoch metrics and model selection: ``metrics=`` built-ins equal scikit-learn /
numpy on the model's own predictions of every epoch (imbalanced classes, validation batches of
unequal size); ``monitor``/``mode`` drive the best epoch, the restored weights, early stopping
and the plateau scheduler together; the built-ins refuse outputs they do not define before the
first training step."""

import logging

import numpy as np
import pytest
import torch

from advanced_training_utils import TrainConfig, train_model_advanced

sk = pytest.importorskip("sklearn.metrics")

QUIET = dict(verbose=False, device="cpu", seed=0)
CE = torch.nn.CrossEntropyLoss()


# ---------------------------------------------------------------- recorded predictions
class _Recorder:
    """Keeps the model's eval-mode outputs on the validation batches (not the first-batch
    check's forward, which sees a training batch), grouped per epoch."""

    def __init__(self, model, val_batches):
        self.val_batches, self.calls = val_batches, []
        model.register_forward_hook(self._hook)

    def _hook(self, module, args, out):
        x = args[0]
        if not module.training and any(x.shape == v.shape and torch.equal(x, v)
                                       for v in self.val_batches):
            self.calls.append(out.detach().double())

    def epochs(self):
        n = len(self.val_batches)
        assert len(self.calls) % n == 0
        return [torch.cat(self.calls[i:i + n]) for i in range(0, len(self.calls), n)]


def _classification(n, seed):
    """Three imbalanced classes (about 60 / 30 / 10 %), partly separable."""
    g = torch.Generator().manual_seed(seed)
    y = torch.multinomial(torch.tensor([0.6, 0.3, 0.1]), n, replacement=True, generator=g)
    x = torch.randn(n, 6, generator=g)
    x[:, :3] += 1.2 * torch.nn.functional.one_hot(y, 3)
    return x, y


def _net(out=3):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, out))


def _loaders(x, y, vx, vy, bs=16, vbs=8):
    ds = torch.utils.data.TensorDataset
    return (torch.utils.data.DataLoader(ds(x, y), batch_size=bs, shuffle=True),
            torch.utils.data.DataLoader(ds(vx, vy), batch_size=vbs))


def test_classification_metrics_equal_sklearn_on_every_epochs_predictions():
    x, y = _classification(160, 0)
    vx, vy = _classification(37, 1)  # batches of 8, 8, 8, 8, 5
    assert sorted(vy.unique().tolist()) == [0, 1, 2] and vy.bincount().min() <= 6
    tl, vl = _loaders(x, y, vx, vy)
    model = _net()
    rec = _Recorder(model, [b for b, _ in vl])
    res = train_model_advanced(model, tl, vl, CE, epochs=4, learning_rate=3e-2,
                               metrics=["uar", "macro_f1", "accuracy", "per_class_recall"],
                               **QUIET)
    preds = [o.argmax(1).numpy() for o in rec.epochs()]
    assert len(preds) == 4
    t = vy.numpy()
    # The batch-mean pitfall would give another number: these values are epoch-level.
    for row, p in zip(res["history"], preds):
        recall = sk.recall_score(t, p, average=None, labels=[0, 1, 2], zero_division=np.nan)
        want = {"val_uar": sk.balanced_accuracy_score(t, p),
                "val_macro_f1": sk.f1_score(t, p, average="macro"),
                "val_accuracy": sk.accuracy_score(t, p),
                **{f"val_recall_{k}": r for k, r in enumerate(recall)}}
        assert {k: row[k] for k in want} == pytest.approx(want, abs=1e-12, rel=0)
    assert len({round(r["val_macro_f1"], 6) for r in res["history"]}) > 1  # it learns


def _ccc(p, t):
    mp, mt = p.mean(0), t.mean(0)
    return 2 * ((p - mp) * (t - mt)).mean(0) / (p.var(0) + t.var(0) + (mp - mt) ** 2)


def test_regression_ccc_and_mae_equal_numpy_on_every_epochs_predictions():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(150, 6, generator=g)
    y = torch.stack([torch.tanh(x[:, 0]), 0.5 * x[:, 1] + 0.3], 1) + 0.2 * torch.randn(150, 2,
                                                                                        generator=g)
    tl, vl = _loaders(x[:110], y[:110], x[110:], y[110:], vbs=12)  # 12, 12, 12, 4
    model = _net(2)
    rec = _Recorder(model, [b for b, _ in vl])
    res = train_model_advanced(model, tl, vl, torch.nn.MSELoss(), epochs=3, learning_rate=1e-2,
                               metrics=["ccc", "mae"], **QUIET)
    t = y[110:].double().numpy()
    for row, out in zip(res["history"], rec.epochs()):
        p = out.numpy()
        ccc, mae = _ccc(p, t), np.abs(p - t).mean(0)
        want = {"val_ccc": ccc.mean(), "val_ccc_0": ccc[0], "val_ccc_1": ccc[1],
                "val_mae": mae.mean(), "val_mae_0": mae[0], "val_mae_1": mae[1]}
        assert {k: row[k] for k in want} == pytest.approx(want, abs=1e-12, rel=0)


# ---------------------------------------------------------------- monitor / mode
VAL_Y = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 1, 2])
PREDS = [[0] * 10,                      # UAR 1/3
         [0] * 9 + [2],                 # 2/3
         VAL_Y.tolist(),                # 1     <- best by UAR
         [0] * 6 + [1, 0, 0] + [0],     # 4/9
         [0] * 6 + [1, 1, 0] + [0],     # 5/9
         [0] * 6 + [1, 1, 1] + [0]]     # 2/3
VAL_LOSS = [1.0, 0.5, 0.6, 0.7, 0.8, 0.9]  # best by val loss: epoch 2


class _Scripted(torch.nn.Module):
    """Validation predictions and losses scripted per epoch; ``w`` moves by -lr each epoch
    (one training batch, loss = mean output), so the weights tell which epoch they are from."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.epoch = 0

    def forward(self, x):
        if self.training:
            self.epoch += 1
            return self.w.expand(x.shape[0], 3)
        if self.epoch == 0:  # the first-batch check
            return torch.zeros(x.shape[0], 3) + 0 * self.w
        pred = torch.tensor(PREDS[self.epoch - 1])[x[:, 0].long()]
        return torch.nn.functional.one_hot(pred, 3).float() + 0 * self.w


def _scripted_run(**options):
    model = _Scripted()

    def criterion(out, y):
        if torch.is_grad_enabled():
            return out.mean()
        return torch.tensor(VAL_LOSS[model.epoch - 1])

    train = [(torch.zeros(4, 1), torch.tensor([0, 1, 2, 0]))]
    ds = torch.utils.data.TensorDataset(torch.arange(10.0)[:, None], VAL_Y)
    val = torch.utils.data.DataLoader(ds, batch_size=4)  # 4, 4, 2
    res = train_model_advanced(
        model, train, val, criterion, epochs=6, optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
        gradient_clip=None, recovery=False, metrics=["uar", "macro_f1"], early_stop_patience=2,
        scheduler_type="plateau", plateau_patience=1, factor=0.5, **QUIET, **options)
    return model, res


def _plateau_lrs(values, mode):
    """torch's own ReduceLROnPlateau on the same values: the LR after each epoch's step."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode=mode, factor=0.5, patience=1)
    out = []
    for v in values:
        sched.step(v)
        out.append(opt.param_groups[0]["lr"])
    return out


def test_monitor_max_drives_best_epoch_weights_early_stopping_and_plateau_together():
    model, res = _scripted_run(monitor="val_uar", mode="max")
    uar = [r["val_uar"] for r in res["history"]]
    truth = [sk.balanced_accuracy_score(VAL_Y.numpy(), np.array(p)) for p in PREDS]
    assert uar == pytest.approx(truth[:len(uar)], abs=1e-12)
    assert res["best_epoch"] == 3 and res["monitor"] == "val_uar" and res["best_metric"] == 1.0
    assert [r["improved"] for r in res["history"]] == [True, True, True, False, False]
    assert res["stopped_early"] and res["epochs_run"] == 5  # two epochs without a better UAR
    assert model.w.item() == pytest.approx(-0.3)  # the weights after epoch 3, restored
    assert res["best_val_loss"] == pytest.approx(VAL_LOSS[2])  # the kept epoch's val loss
    assert [r["lr"] for r in res["history"]] == pytest.approx(_plateau_lrs(uar, "max"))
    assert res["history"][-1]["lr"] == pytest.approx(0.05)


def test_default_monitor_is_val_loss_and_picks_another_epoch_on_the_same_run():
    model, res = _scripted_run()
    assert res["monitor"] == "val_loss" and res["best_epoch"] == 2
    assert res["best_val_loss"] == res["best_metric"] == 0.5
    assert res["epochs_run"] == 4 and model.w.item() == pytest.approx(-0.2)
    losses = [r["val_loss"] for r in res["history"]]
    assert [r["lr"] for r in res["history"]] == pytest.approx(_plateau_lrs(losses, "min"))


@pytest.mark.parametrize("options, exc, match", [
    (dict(mode="maximum"), ValueError, r"mode must be one of 'min', 'max'; got 'maximum'"),
    (dict(monitor="val_uar"), ValueError,
     r"monitor must be a key the run logs, one of val_loss, train_loss; got 'val_uar' \(add the "
     r"metric to metrics= to monitor it\)"),
    (dict(monitor="val_f1", metrics=["uar", "per_class_recall"]), ValueError,
     r"one of val_loss, train_loss, val_uar, val_recall_<class>; got 'val_f1'"),
    (dict(monitor="uar", metrics="uar"), ValueError, r"got 'uar'"),
    (dict(monitor=3), TypeError, r"monitor must be a str, got 3"),
])
def test_monitor_and_mode_are_checked_at_construction(options, exc, match):
    with pytest.raises(exc, match=match):
        TrainConfig.from_options(**options)


@pytest.mark.parametrize("monitor", ["val_uar", "val_recall_2", "val_loss", "train_loss"])
def test_monitor_accepts_every_logged_key(monitor):
    assert TrainConfig.from_options(monitor=monitor, mode="max",
                                    metrics=["uar", "per_class_recall"]).monitor == monitor


def test_a_validation_monitor_needs_a_val_loader_and_a_mode_mismatch_is_logged(caplog):
    x, y = _classification(32, 0)
    tl, _ = _loaders(x, y, x, y)
    with pytest.raises(ValueError, match=r"monitor='val_uar' needs a val_loader"):
        train_model_advanced(_net(), tl, None, CE, epochs=1, metrics="uar", monitor="val_uar",
                             mode="max", **QUIET)
    tl, vl = _loaders(x, y, x, y)
    with caplog.at_level(logging.WARNING):
        train_model_advanced(_net(), tl, vl, CE, epochs=1, metrics="uar", monitor="val_uar",
                             **QUIET)
    assert "monitor='val_uar' with mode='min': a lower value counts as better" in caplog.text


# ---------------------------------------------------------------- outputs the built-ins refuse
class _Counting(torch.nn.Module):
    """Counts training forwards: the error must come before the first training step."""

    def __init__(self, inner, wrap=lambda o: o):
        super().__init__()
        self.inner, self.wrap, self.train_calls = inner, wrap, 0

    def forward(self, x):
        self.train_calls += self.training
        return self.wrap(self.inner(x))


def test_tuple_output_with_a_builtin_metric_fails_before_training_naming_the_type():
    """Was: a bare AttributeError ('tuple' object has no attribute 'float') after a whole
    training epoch."""
    x, y = _classification(64, 0)
    tl, vl = _loaders(x, y, x, y)
    model = _Counting(_net(), wrap=lambda o: (o, o.detach()))
    with pytest.raises(TypeError, match=r"outputs must be a torch.Tensor, got tuple: the built-in "
                                        r"metrics \['accuracy'\] need .* \(logits, embedding\)"):
        train_model_advanced(model, tl, vl, lambda out, t: CE(out[0], t), epochs=1,
                             metrics="accuracy", **QUIET)
    assert model.train_calls == 0
    # A callable that picks the logits is the way out (legacy example-weighted batch mean).
    res = train_model_advanced(_Counting(_net(), wrap=lambda o: (o, o.detach())), tl, vl,
                               lambda out, t: CE(out[0], t), epochs=1, **QUIET,
                               metrics={"acc": lambda out, t: (out[0].argmax(1) == t).float()
                                        .mean()})
    assert 0 <= res["history"][0]["val_acc"] <= 1


@pytest.mark.parametrize("shape", ["[B, 1]", "[B]"])
def test_single_logit_binary_outputs_are_refused_by_accuracy(shape):
    """Was: val_accuracy 0.5078 (the fraction of negatives) for a model 97.7% right."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 6, generator=g)
    y = (x[:, 0] > 0).float()
    squeeze = (lambda o: o[:, 0]) if shape == "[B]" else (lambda o: o)
    tl, vl = _loaders(x, y if shape == "[B]" else y[:, None], x, y if shape == "[B]" else y[:, None])
    model = _Counting(_net(1), wrap=squeeze)
    want = r"\(16, 1\)" if shape == "[B, 1]" else r"\(16,\)"
    with pytest.raises(ValueError, match=want + r" hold one value per example .* need logits of "
                                              r"shape \[B, C\], one column per class, C >= 2"):
        train_model_advanced(model, tl, vl, torch.nn.BCEWithLogitsLoss(), epochs=1,
                             metrics="accuracy", **QUIET)
    assert model.train_calls == 0


def test_multilabel_targets_are_refused_by_the_classification_builtins():
    """Was: the argmax of a multi-label row taken as 'the' class (or a broadcasting error)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 6, generator=g)
    y = (x[:, :3] > 0).float()  # several labels per row
    tl, vl = _loaders(x, y, x, y)
    model = _Counting(_net(3))
    with pytest.raises(ValueError, match=r"targets of shape \[B, C\] \(16, 3\) must be class "
                                         r"probabilities .* Multi-label targets are not defined"):
        train_model_advanced(model, tl, vl, torch.nn.BCEWithLogitsLoss(), epochs=1,
                             metrics="accuracy", **QUIET)
    assert model.train_calls == 0


def test_soft_targets_are_accepted_by_the_first_batch_check():
    x, y = _classification(64, 0)
    soft = torch.nn.functional.one_hot(y, 3).float() * 0.9 + 0.1 / 3  # label smoothing
    tl, vl = _loaders(x, soft, x, soft)
    res = train_model_advanced(_net(), tl, vl, CE, epochs=1, metrics=["uar"], **QUIET)
    assert 0 <= res["history"][0]["val_uar"] <= 1

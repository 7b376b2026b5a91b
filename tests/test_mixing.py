"""Augmentation that sees the labels (mixing.py, and its wiring in the engine): mixup,
time-segment cutmix and label smoothing against hand computations and torch's own loss, a whole
run against a hand loop, bit-exact resume, validation on the true labels, and the errors."""

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from _helpers import Boom, crashing, make_data, make_model
from advanced_training_utils import checkpoint as ck
from advanced_training_utils import train_model_advanced
from advanced_training_utils.engine.config import TrainConfig
from advanced_training_utils.mixing import BatchMixing

CE = torch.nn.CrossEntropyLoss()
QUIET = dict(device="cpu", verbose=False)


def _hand_ce(logits, probs):
    """Cross-entropy with probability targets, written out."""
    return -(probs * F.log_softmax(logits, dim=1)).sum(1).mean()


def _onehot(y, c, dtype=torch.float64):
    return torch.eye(c, dtype=dtype)[y]


# ------------------------------------------------------------ the loss against hand computations
def test_mixup_soft_target_loss_equals_the_hand_computation():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 5, dtype=torch.float64, generator=g)
    y = torch.randint(0, 3, (8,), generator=g)
    lin = torch.nn.Linear(5, 3).double()
    xm, t = _mixer(mixup_alpha=0.4)(x, y)
    rng = np.random.default_rng(7)  # the documented draws: lam, then the permutation
    lam = rng.beta(0.4, 0.4)
    perm = torch.from_numpy(rng.permutation(8))
    hand_x = lam * x + (1 - lam) * x[perm]
    hand_t = lam * _onehot(y, 3) + (1 - lam) * _onehot(y[perm], 3)
    assert 0 < lam < 1 and not torch.equal(perm, torch.arange(8))
    assert torch.allclose(xm, hand_x, rtol=0, atol=1e-15) and torch.allclose(t, hand_t, atol=1e-15)
    assert torch.allclose(CE(lin(xm), t), _hand_ce(lin(hand_x), hand_t), rtol=1e-13, atol=0)


def _mixer(num_classes=3, seed=7, **kw):
    m = BatchMixing(seed=seed, **kw)
    m.set_classes(num_classes, torch.float64)
    return m


def _hand_cut(x, y, rng, alpha, c):
    lam = rng.beta(alpha, alpha)
    perm = torch.from_numpy(rng.permutation(x.shape[0]))
    steps = x.shape[-1]
    length = int(round((1 - lam) * steps))
    start = int(rng.integers(0, steps - length + 1))
    out = x.clone()
    out[..., start:start + length] = x[perm][..., start:start + length]
    kept = 1 - length / steps
    return out, kept * _onehot(y, c) + (1 - kept) * _onehot(y[perm], c), length


def test_time_segment_mix_soft_target_loss_equals_the_hand_computation():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 4, 20, dtype=torch.float64, generator=g)  # [B, F, T] spectrograms
    y = torch.randint(0, 4, (6,), generator=g)
    mix, rng = _mixer(num_classes=4, cutmix_alpha=1.0), np.random.default_rng(7)
    lin = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(80, 4)).double()
    lengths = set()
    for _ in range(5):  # consecutive batches: the generator's stream goes on
        xm, t = mix(x, y)
        hand_x, hand_t, length = _hand_cut(x, y, rng, 1.0, 4)
        lengths.add(length)
        assert torch.equal(xm, hand_x)
        assert torch.allclose(t, hand_t, rtol=0, atol=1e-15)
        assert torch.allclose(CE(lin(xm), t), _hand_ce(lin(hand_x), hand_t), rtol=1e-13, atol=0)
        changed = (xm != x).any(dim=0).any(dim=0).nonzero().flatten()  # time steps only
        assert changed.numel() <= length
    assert len(lengths) > 1 and max(lengths) > 0


def test_both_alphas_switch_per_batch_as_documented():
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(5, 3, 10, dtype=torch.float64, generator=g), torch.tensor([0, 1, 2, 1, 0])
    mix, rng = _mixer(mixup_alpha=0.3, cutmix_alpha=1.0), np.random.default_rng(7)
    kinds = []
    for _ in range(8):
        xm, t = mix(x, y)
        if rng.random() < 0.5:
            hand_x, hand_t, _ = _hand_cut(x, y, rng, 1.0, 3)
            kinds.append("cut")
        else:
            lam = rng.beta(0.3, 0.3)
            perm = torch.from_numpy(rng.permutation(5))
            hand_x = lam * x + (1 - lam) * x[perm]
            hand_t = lam * _onehot(y, 3) + (1 - lam) * _onehot(y[perm], 3)
            kinds.append("mix")
        assert torch.allclose(xm, hand_x, rtol=0, atol=1e-15)
        assert torch.allclose(t, hand_t, rtol=0, atol=1e-15)
    assert set(kinds) == {"cut", "mix"}


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.35])
def test_label_smoothing_equals_torchs_cross_entropy_label_smoothing(eps):
    g = torch.Generator().manual_seed(3)
    out = torch.randn(16, 5, dtype=torch.float64, generator=g)
    y = torch.randint(0, 5, (16,), generator=g)
    _, t = _mixer(num_classes=5, label_smoothing=eps)(torch.zeros(16, 2), y)
    ref = torch.nn.CrossEntropyLoss(label_smoothing=eps)(out, y)
    assert torch.allclose(CE(out, t), ref, rtol=1e-13, atol=0)
    assert torch.allclose(_hand_ce(out, t), ref, rtol=1e-13, atol=0)


def test_label_smoothing_with_mixup_mixes_the_smoothed_targets():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(8, 3, dtype=torch.float64, generator=g)
    y = torch.randint(0, 4, (8,), generator=g)
    _, t = _mixer(num_classes=4, mixup_alpha=1.0, label_smoothing=0.2)(x, y)
    rng = np.random.default_rng(7)
    lam, perm = rng.beta(1.0, 1.0), torch.from_numpy(rng.permutation(8))

    def smooth(v):
        return 0.8 * _onehot(v, 4) + 0.2 / 4
    assert torch.allclose(t, lam * smooth(y) + (1 - lam) * smooth(y[perm]), rtol=0, atol=1e-15)


def test_float_targets_are_mixed_linearly():
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(6, 4, generator=g), torch.rand(6, 7, generator=g)  # multi-label probs
    xm, t = BatchMixing(mixup_alpha=0.5, seed=7)(x, y)
    rng = np.random.default_rng(7)
    lam, perm = rng.beta(0.5, 0.5), torch.from_numpy(rng.permutation(6))
    assert torch.allclose(t, lam * y + (1 - lam) * y[perm], atol=1e-6)
    assert torch.allclose(xm, lam * x + (1 - lam) * x[perm], atol=1e-6)


def test_state_round_trip_into_a_fresh_mixer_continues_the_draws():
    x, y = torch.randn(8, 2, 12), torch.randint(0, 3, (8,))
    a = BatchMixing(mixup_alpha=0.4, cutmix_alpha=1.0, num_classes=3, seed=3)
    a(x, y)
    fresh = BatchMixing(mixup_alpha=0.4, cutmix_alpha=1.0, num_classes=3, seed=99)
    fresh.load_state_dict(a.state_dict())
    for _ in range(4):
        (xa, ta), (xb, tb) = a(x, y), fresh(x, y)
        assert torch.equal(xa, xb) and torch.equal(ta, tb)


# ------------------------------------------------------------ a whole run against a hand loop
def test_a_run_with_mixup_equals_a_hand_loop_doing_the_same_mixing():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 6, dtype=torch.float64, generator=g)
    y = (x[:, :3].argmax(1)).long()
    batches = [(x[i:i + 12], y[i:i + 12]) for i in range(0, 48, 12)]

    def model():
        torch.manual_seed(1)
        return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(),
                                   torch.nn.Linear(8, 3)).double()

    ran = model()
    train_model_advanced(ran, batches, None, CE, epochs=3, seed=5, mixup_alpha=0.4,
                         label_smoothing=0.1, optimizer=lambda p: torch.optim.SGD(p, lr=0.2),
                         use_scheduler=False, gradient_clip=None, restore_best_weights=False,
                         **QUIET)
    hand = model()
    opt, rng = torch.optim.SGD(hand.parameters(), lr=0.2), np.random.default_rng(5)
    for _ in range(3):
        for xb, yb in batches:
            lam, perm = rng.beta(0.4, 0.4), torch.from_numpy(rng.permutation(len(yb)))
            t = 0.9 * _onehot(yb, 3) + 0.1 / 3
            xm, t = xb * lam + xb[perm] * (1 - lam), t * lam + t[perm] * (1 - lam)
            opt.zero_grad()
            CE(hand(xm), t).backward()
            opt.step()
    for a, b in zip(ran.parameters(), hand.parameters()):
        assert torch.equal(a, b)


# ------------------------------------------------------------ resume, bit-exact
OPTS = dict(epochs=3, learning_rate=3e-3, verbose=False, device="cpu",
            use_augmentation=True, augment="emotion", augment_options={"noise_level": 0.05},
            mixup_alpha=0.4, cutmix_alpha=1.0, label_smoothing=0.1,
            restore_best_weights=False, model_name="m")


def _dropout_model(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 32), torch.nn.ReLU(),
                               torch.nn.Dropout(0.3), torch.nn.Linear(32, 3))


def _loaders():
    return (torch.utils.data.DataLoader(make_data(96), batch_size=8, shuffle=True),
            torch.utils.data.DataLoader(make_data(32, seed=5), batch_size=16))


@pytest.mark.parametrize("crash_at, seed", [(5, 0), (17, 0), (9, None)])
def test_mid_epoch_resume_with_mixing_is_bit_exact(tmp_path, crash_at, seed):
    tl, vl = _loaders()
    opts = {**OPTS, "seed": seed}
    ref = _dropout_model(1)  # seed=None: the mixing seed is drawn from torch's global RNG
    r_ref = train_model_advanced(ref, tl, vl, CE, checkpoint_dir=tmp_path / "ref", **opts)
    m = _dropout_model(1)
    with pytest.raises(Boom):
        train_model_advanced(m, tl, vl, crashing(crash_at), checkpoint_dir=tmp_path / "c",
                             checkpoint_every_n_steps=1, **opts)
    assert ck.load_checkpoint(tmp_path / "c" / "m_last.pt")[ck.MIXING_KEY]["rng"]["state"]
    resumed = _dropout_model(7)
    r = train_model_advanced(resumed, tl, vl, CE, checkpoint_dir=tmp_path / "c", resume=True,
                             checkpoint_every_n_steps=1, **opts)
    for a, b in zip(ref.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    strip = lambda h: [{k: v for k, v in e.items() if k != "seconds"} for e in h]  # noqa: E731
    assert strip(r["history"]) == strip(r_ref["history"])


WORKER = Path(__file__).with_name("crash_worker.py")


def _spawn(out, *extra):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")
           + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen([sys.executable, str(WORKER), str(out), "--epochs", "2", "--mixup",
                             *extra], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, env=env)


def test_kill_9_with_mixup_then_resume_is_bit_exact(tmp_path):
    ref = tmp_path / "ref"
    assert _spawn(ref).wait(timeout=120) == 0
    rng, kills, out = random.Random(99), 0, tmp_path / "killed"
    while kills < 2:
        p = _spawn(out)
        for _ in range(rng.randint(3, 40)):  # 2 epochs: 54 criterion calls
            if not p.stdout.readline():
                break
        if p.poll() is not None:
            break
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=60)
        kills += 1
    assert _spawn(out).wait(timeout=120) == 0
    want, got = (torch.load(d / "final.pt", weights_only=True) for d in (ref, out))
    assert kills == 2
    assert all(torch.equal(got[k], want[k]) for k in want)


# ------------------------------------------------------------ validation: the true labels only
def test_validation_sees_the_true_labels_and_unaugmented_inputs():
    tl = torch.utils.data.DataLoader(make_data(64), batch_size=16, shuffle=True)
    val = make_data(40, seed=3)
    vl = torch.utils.data.DataLoader(val, batch_size=16)
    calls = []

    def criterion(out, t):  # a plain function: the first-batch check does not call it
        calls.append((torch.is_grad_enabled(), t.clone()))
        return F.cross_entropy(out, t)

    augmented = []

    def pair_augment(x, y):
        augmented.append(len(y))
        return x + 0.01, y

    model = make_model(2)
    res = train_model_advanced(model, tl, vl, criterion, epochs=1, seed=0, mixup_alpha=1.0,
                               label_smoothing=0.2, use_augmentation=True, augment=pair_augment,
                               augment_targets=True, metrics=["accuracy", "macro_f1"],
                               restore_best_weights=False, **QUIET)
    train_t = [t for grad, t in calls if grad]
    val_t = [t for grad, t in calls if not grad]
    assert augmented == [16] * 4  # training batches only
    assert all(t.is_floating_point() and t.shape == (16, 3) for t in train_t)
    assert torch.equal(torch.cat(val_t), val.tensors[1])  # the true labels, in order
    model.eval()
    with torch.no_grad():
        logits = model(val.tensors[0])
    truth = val.tensors[1]
    row = res["history"][-1]
    assert row["val_loss"] == pytest.approx(F.cross_entropy(logits, truth).item(), rel=1e-6)
    acc = (logits.argmax(1) == truth).double().mean().item()
    assert row["val_accuracy"] == pytest.approx(acc, rel=1e-9)
    f1 = np.mean([_f1(logits.argmax(1), truth, c) for c in range(3)])
    assert row["val_macro_f1"] == pytest.approx(f1, rel=1e-9)


def _f1(pred, truth, c):
    tp = ((pred == c) & (truth == c)).sum().item()
    fp, fn = ((pred == c) & (truth != c)).sum().item(), ((pred != c) & (truth == c)).sum().item()
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


# ------------------------------------------------------------ the hook and the user's callables
def test_a_one_argument_augment_gets_the_inputs_and_the_targets_pass_through():
    seen = []

    def aug(x):
        seen.append(x.shape)
        return x * 1.0

    targets = []

    def criterion(out, t):
        targets.append(t)
        return F.cross_entropy(out, t)

    tl = torch.utils.data.DataLoader(make_data(32), batch_size=16)
    train_model_advanced(make_model(1), tl, None, criterion, epochs=1, use_augmentation=True,
                         augment=aug, **QUIET)
    assert seen == [(16, 8, 6)] * 2
    assert torch.equal(torch.cat(targets), make_data(32).tensors[1])


def test_a_pair_augment_declared_with_augment_targets_gets_and_returns_the_targets():
    targets = []

    def criterion(out, t):
        targets.append(t)
        return F.cross_entropy(out, t)

    def relabel(x, y):  # a callable that sees the labels and changes them
        return x, (y + 1) % 3

    data = make_data(32)
    tl = torch.utils.data.DataLoader(data, batch_size=16)
    train_model_advanced(make_model(1), tl, None, criterion, epochs=1, use_augmentation=True,
                         augment=relabel, augment_targets=True, **QUIET)
    assert torch.equal(torch.cat(targets), (data.tensors[1] + 1) % 3)


def test_a_pair_augment_must_return_inputs_and_targets():
    tl = torch.utils.data.DataLoader(make_data(32), batch_size=16)
    with pytest.raises(TypeError, match=r"augment_targets=True: augment must return \(inputs, "
                                        r"targets\), got Tensor"):
        train_model_advanced(make_model(1), tl, None, CE, epochs=1, use_augmentation=True,
                             augment=lambda x, y: x, augment_targets=True, **QUIET)


def test_the_mixing_is_in_the_table_and_after_the_augmentation():
    from advanced_training_utils.engine import distributed
    from advanced_training_utils.engine.parts import build_parts

    def rows(x):  # each example becomes its row number: mixing after it shows as fractions
        return torch.arange(len(x), dtype=x.dtype)[:, None, None].expand_as(x).clone()

    cfg = TrainConfig.from_options(device="cpu", mixup_alpha=0.2, seed=0, use_augmentation=True,
                                   augment=rows)
    tl = torch.utils.data.DataLoader(make_data(16), batch_size=8)
    p = build_parts(make_model(), tl, None, CE, cfg, torch.device("cpu"),
                    distributed.setup(torch.device("cpu"), 60.0))
    mixing = p.table[ck.MIXING_KEY]
    assert isinstance(mixing, BatchMixing) and mixing.mixup_alpha == 0.2
    mixing.set_classes(3, torch.float32)
    x, y = make_data(8).tensors
    xm, t = p.steps.augment(x, y)
    rng = np.random.default_rng(0)
    lam, perm = rng.beta(0.2, 0.2), torch.from_numpy(rng.permutation(8))
    a = rows(x)
    assert torch.allclose(xm, lam * a + (1 - lam) * a[perm]) and t.shape == (8, 3)


# ------------------------------------------------------------ errors, named
@pytest.mark.parametrize("bad, error, message", [
    (dict(mixup_alpha=0), ValueError, "mixup_alpha must be > 0, got 0"),
    (dict(mixup_alpha=-0.5), ValueError, r"mixup_alpha must be > 0, got -0.5"),
    (dict(mixup_alpha=float("nan")), ValueError, "mixup_alpha must be a finite number, got nan"),
    (dict(mixup_alpha="0.2"), TypeError, "mixup_alpha must be a real number, got '0.2'"),
    (dict(cutmix_alpha=0.0), ValueError, "cutmix_alpha must be > 0, got 0.0"),
    (dict(label_smoothing=1.0), ValueError, r"label_smoothing must be in \[0, 1\), got 1.0"),
    (dict(label_smoothing=-0.1), ValueError, r"label_smoothing must be in \[0, 1\), got -0.1"),
    (dict(augment_targets=1), TypeError, "augment_targets must be a bool, got 1"),
    (dict(augment="audio", augment_targets=True), ValueError,
     "augment_targets=True needs a callable augment= taking and returning \\(inputs, targets\\); "
     "got augment='audio'"),
])
def test_bad_options_are_refused_naming_the_argument(bad, error, message):
    with pytest.raises(error, match=message):
        TrainConfig.from_options(**bad)


class _IndexOnly(torch.nn.Module):
    def forward(self, out, t):
        return F.multi_margin_loss(out, t)


@pytest.mark.parametrize("criterion, message", [
    (torch.nn.NLLLoss(), "with mixup_alpha=0.2 the criterion gets class probabilities \\[B, C\\] "
     "as targets, but NLLLoss takes class indices only: use torch.nn.CrossEntropyLoss"),
    (_IndexOnly(), "with mixup_alpha=0.2 the criterion gets class probabilities \\[B, C\\] as "
     "targets, but _IndexOnly refused them: .*multi_margin_loss"),
])
def test_a_criterion_that_refuses_probabilities_fails_at_the_first_batch(criterion, message):
    model = make_model(1)
    before = [q.clone() for q in model.parameters()]
    tl = torch.utils.data.DataLoader(make_data(32), batch_size=16)
    with pytest.raises(ValueError, match=message):
        train_model_advanced(model, tl, None, criterion, epochs=1, mixup_alpha=0.2, **QUIET)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # before a step


def test_label_smoothing_on_float_targets_is_refused_at_the_first_batch():
    x = torch.randn(16, 4)
    tl = [(x, x[:, :2])]
    with pytest.raises(ValueError, match="label_smoothing=0.1 applies to class-index targets"):
        train_model_advanced(torch.nn.Linear(4, 2), tl, None, torch.nn.MSELoss(), epochs=1,
                             label_smoothing=0.1, **QUIET)


def test_class_targets_need_a_model_output_of_classes():
    x = torch.randn(8, 4)
    tl = [(x, torch.randint(0, 2, (8,)))]

    def crit(out, t):
        return out.mean()
    with pytest.raises(ValueError, match=r"with cutmix_alpha=1.0 and class-index targets the "
                                         r"model output must be \[B, C\] \(C classes\), got "
                                         r"\(8, 2, 1\)"):
        model = torch.nn.Sequential(torch.nn.Linear(4, 2), torch.nn.Unflatten(1, (2, 1)))
        train_model_advanced(model, tl, None, crit, epochs=1, cutmix_alpha=1.0, **QUIET)

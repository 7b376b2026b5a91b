"""The step guard's spike rule: invariant under shifting and scaling the loss, silent on a flat
loss, and still catching real spikes (the end-to-end runs are in test_recovery.py)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from advanced_training_utils import train_model_advanced
from advanced_training_utils.engine.health.guard import StepGuard


def _guard(spike_factor=10.0, window=20):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    return StepGuard(opt, spike_factor=spike_factor, spike_window=window)


def _decisions(losses, guard=None, **kw):
    guard = guard or _guard(**kw)
    one = torch.ones(())
    flags = [guard.is_bad(torch.tensor(v, dtype=torch.float32), one) for v in losses]
    return [bool(f) for f in flags]


# Losses on a 1/16 grid with rare jumps, so that shifted and scaled copies are exact floats.
_loss_seqs = st.lists(
    st.one_of(st.integers(-64, 64), st.integers(-64, 64), st.integers(-64, 64),
              st.integers(-4096, 4096)).map(lambda m: m / 16),
    min_size=10, max_size=80)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(losses=_loss_seqs, c=st.sampled_from([-100.0, -1.0, 0.0, 1.0, 100.0]),
       s=st.sampled_from([0.25, 1.0, 3.0, 10.0, 1000.0]),
       k=st.sampled_from([1.5, 3.0, 10.0]), window=st.sampled_from([4, 9, 20]))
def test_spike_decisions_are_shift_and_scale_invariant(losses, c, s, k, window):
    base = _decisions(losses, spike_factor=k, window=window)
    moved = _decisions([s * v + c for v in losses], spike_factor=k, window=window)
    assert moved == base


@pytest.mark.parametrize("level", [0.0, -0.91, 5.0, -100.0])
def test_a_flat_loss_never_spikes(level):
    assert not any(_decisions([level] * 100))


def test_a_loss_at_zero_then_ordinary_positive_losses_does_not_spike():
    g = torch.Generator().manual_seed(0)
    later = (0.2 + 0.8 * torch.rand(100, generator=g)).tolist()
    assert not any(_decisions([0.0] * 40 + later))


@pytest.mark.parametrize("center, noise", [(-0.91, 0.01), (0.5, 0.1), (-50.0, 2.0), (1e-3, 1e-4)])
def test_noise_is_not_a_spike_and_a_jump_of_many_spreads_is(center, noise):
    g = torch.Generator().manual_seed(1)
    history = (center + noise * torch.randn(60, generator=g)).tolist()
    assert not any(_decisions(history))
    jump = center + 50 * abs(center) + 200 * noise  # 50x a positive loss; far above for others
    flags = _decisions(history + [jump] + history[:10])
    assert flags[60] and not any(flags[:60]) and not any(flags[61:])


def test_negative_loss_after_a_slightly_lower_one_is_not_a_spike():
    g = torch.Generator().manual_seed(2)
    history = (-0.91 + 0.002 * torch.randn(40, generator=g)).tolist()
    assert not any(_decisions(history + [-0.9, -0.905, -0.9]))


def test_floor_a_loss_that_became_flat_does_not_spike_on_a_wobble():
    # A fixed batch: the loss falls fast, then sits still; a small wobble is no spike.
    falling = [2.0 * 0.8 ** i for i in range(30)]
    g = torch.Generator().manual_seed(4)
    flat = (falling[-1] * (1 + 1e-5 * torch.randn(30, generator=g))).tolist()
    flags = _decisions(falling + flat + [falling[-1] * 2, falling[-1]])
    assert not any(flags)


def test_state_round_trip_gives_the_same_decisions():
    g = torch.Generator().manual_seed(3)
    seq = (-2.0 + 0.1 * torch.randn(50, generator=g)).tolist() + [5.0, -2.0, 9.0, -2.1]
    a = _guard()
    _decisions(seq[:30], guard=a)
    b = _guard()
    b.load_state_dict(a.state_dict())
    assert _decisions(seq[30:], guard=b) == _decisions(seq[30:], guard=a)
    assert b.state_dict()["spread_max"] is not None


def _negcos(out, y):
    return -torch.nn.functional.cosine_similarity(out, y).mean()


@pytest.mark.parametrize("criterion", [
    _negcos, lambda o, y: torch.nn.functional.mse_loss(o, y) - 100.0, lambda o, y: 0.0 * o.sum()])
def test_negative_or_zero_losses_train_without_skips(criterion):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 5, generator=g)
    y = x @ torch.randn(5, 4, generator=g)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    torch.manual_seed(0)
    res = train_model_advanced(torch.nn.Linear(5, 4), loader, None, criterion, epochs=3,
                               device="cpu", verbose=False, seed=0, use_scheduler=False)
    assert res["skipped_steps"] == 0 and res["rollbacks"] == 0


@pytest.mark.parametrize("shift, scale", [(0.0, 1.0), (-100.0, 1.0), (-3.0, 0.5), (7.0, 4.0)])
def test_a_shifted_or_scaled_loss_skips_the_same_spike(shift, scale):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 5, generator=g)
    y = (x[:, :3].argmax(1))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    calls = [0]

    def spiky(out, t):
        calls[0] += 1
        loss = torch.nn.functional.cross_entropy(out, t) * (50.0 if calls[0] == 50 else 1.0)
        return loss * scale + shift

    torch.manual_seed(0)
    res = train_model_advanced(torch.nn.Linear(5, 3), loader, None, spiky, epochs=2,
                               device="cpu", verbose=False, seed=0, use_scheduler=False)
    assert res["skipped_steps"] == 1 and res["history"][1]["spike_steps"] == 1
    assert math.isfinite(res["history"][-1]["train_loss"])


def test_a_restored_guard_refreshes_its_threshold_on_the_same_steps():
    """The threshold is refreshed every 8 steps: a guard restored after 30 steps refreshes at
    step 32 like the uninterrupted one, not at once. Here losses rise to 2.0 (under the
    threshold) at steps 25-29 and a 3.5 at step 30 is a spike by the threshold of step 24; a
    threshold refreshed at step 30 would count the 2.0s in the spread and let it through."""
    g = torch.Generator().manual_seed(5)
    seq = (1.0 + 0.05 * torch.randn(25, generator=g)).tolist() + [2.0] * 5 + [3.5, 1.0, 1.0]
    reference = _decisions(seq)
    assert reference[30] and not any(reference[:30])
    a = _guard()
    _decisions(seq[:30], guard=a)
    b = _guard()
    b.load_state_dict(a.state_dict())
    assert b.steps_seen == a.steps_seen == 30
    assert _decisions(seq[30:], guard=b) == reference[30:]


_NAN = math.nan


@pytest.mark.parametrize("intervals, expected", [
    ([[]], None),                                   # no step yet
    ([[1.0, 1.0, 1.0]], 0),                         # no bad step
    ([[1.0, _NAN, 1.0]], 0),                        # a bad step, then a good one
    ([[1.0, _NAN, _NAN, _NAN]], 3),                 # the run at the end
    ([[_NAN, _NAN]], 2),                            # every step bad
    ([[1.0, _NAN], [_NAN, _NAN], [_NAN]], 4),       # a run across reading intervals
    ([[_NAN, _NAN], [1.0, _NAN]], 1),               # broken by a good step
    ([[_NAN], [1.0]], 0),                           # ... which ends the run
])
def test_consecutive_is_the_run_of_bad_steps_at_the_end(intervals, expected):
    """``consecutive()``: the bad steps since the last good one, carried across
    ``reset_interval()`` (an epoch, a recovery check interval)."""
    guard = StepGuard(torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1))
    one = torch.ones(())
    for i, losses in enumerate(intervals):
        if i:
            guard.reset_interval()
        for v in losses:
            guard.is_bad(torch.tensor(v), one)
    run = guard.consecutive()
    assert (None if run is None else float(run)) == expected

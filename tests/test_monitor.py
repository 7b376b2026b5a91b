"""The divergence monitor (engine/health/monitor.py): the one owner of the guard and recovery.
Snapshots through the table restore the parts bit for bit; the per-step calls are the guard's
own; the epoch end counts skips and rolls back; its state round-trips into a fresh monitor."""

import copy
import math

import torch

from _helpers import make_model
from advanced_training_utils import checkpoint as ck
from advanced_training_utils.clipping import GradientClipper
from advanced_training_utils.engine.health.guard import StepGuard
from advanced_training_utils.engine.health.monitor import DivergenceMonitor
from advanced_training_utils.engine.health.recovery import Recovery
from advanced_training_utils.engine.parts import NoSchedule
from advanced_training_utils.engine.state import KeepSettings, save_parts
from advanced_training_utils.precision import MixedPrecisionTrainer
from advanced_training_utils.scheduler import LearningRateScheduler
from test_state import assert_same

CE = torch.nn.CrossEntropyLoss()
X, Y = torch.randn(8, 8, 6, generator=torch.Generator().manual_seed(0)), torch.tensor(
    [0, 1, 2, 0, 1, 2, 0, 1])


def _monitor(schedule=True, check_every=None, seed=0, **options):
    model = make_model(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = LearningRateScheduler(opt, "cosine", T_max=10) if schedule else NoSchedule(opt)
    clipper = GradientClipper(0.5)
    table = {ck.MODEL_KEY: model, ck.OPTIMIZER_KEY: opt, ck.SCHEDULER_KEY: sched,
             ck.PRECISION_KEY: MixedPrecisionTrainer(enabled=False, device="cpu"),
             ck.CLIPPER_KEY: KeepSettings(clipper, "max_norm", "norm_type")}
    guard = StepGuard(opt)
    recovery = dict(rollback_after=5, lr_factor=0.5, max_rollbacks=3, divergence_factor=3.0)
    rec = Recovery(table, model, opt, sched, guard, **{**recovery, **options})
    return DivergenceMonitor(guard, rec, check_every), table, clipper


def _steps(monitor, table, clipper, n, loss_scale=1.0):
    model, opt = table[ck.MODEL_KEY], table[ck.OPTIMIZER_KEY]
    for _ in range(n):
        opt.zero_grad()
        loss = CE(model(X), Y) * loss_scale
        loss.backward()
        norm = clipper.clip(model)
        monitor.step(monitor.is_bad(loss, norm))
        table[ck.SCHEDULER_KEY].step()


def test_per_step_calls_are_the_guards_own_methods():
    monitor, _, _ = _monitor()
    assert monitor.is_bad == monitor.guard.is_bad and monitor.step == monitor.guard.step


def test_snapshot_through_the_table_restores_every_part_bit_for_bit():
    monitor, table, clipper = _monitor()
    _steps(monitor, table, clipper, 2)
    monitor.snapshot()
    snap = copy.deepcopy(save_parts(table))  # state dicts hold the live tensors
    _steps(monitor, table, clipper, 3)
    assert not torch.equal(table[ck.MODEL_KEY][1].weight, snap[ck.MODEL_KEY]["1.weight"])
    monitor.recovery._restore()
    assert_same(save_parts(table), snap)
    _steps(monitor, table, clipper, 1)  # a second rollback restores the same snapshot
    monitor.recovery._restore()
    assert_same(save_parts(table), snap)


def test_a_rollback_restores_the_snapshot_and_lowers_the_lr():
    for schedule in (True, False):
        monitor, table, clipper = _monitor(schedule=schedule, rollback_after=2, lr_factor=0.5)
        monitor.snapshot()
        weights = {k: v.clone() for k, v in table[ck.MODEL_KEY].state_dict().items()}
        lr = table[ck.OPTIMIZER_KEY].param_groups[0]["lr"]
        monitor.start_interval()
        _steps(monitor, table, clipper, 3, loss_scale=math.nan)  # every step bad: skipped
        nums = {k: (None if v is None else float(v))
                for k, v in monitor.epoch_values().items()}
        health = monitor.end_epoch(nums, epoch=1, first_batch=0, lr_history=[lr])
        assert (health.skipped, health.spikes) == (3, 0) and nums == {}
        assert health.event is not None and health.event.kind == "rollback"
        assert monitor.rollbacks == 1 and monitor.skipped_steps == 3
        assert table[ck.OPTIMIZER_KEY].param_groups[0]["lr"] == lr * 0.5
        for k, v in table[ck.MODEL_KEY].state_dict().items():
            assert torch.equal(v, weights[k]), k


def test_a_clean_epoch_counts_nothing_and_keeps_going():
    monitor, table, clipper = _monitor()
    monitor.snapshot()
    monitor.start_interval()
    _steps(monitor, table, clipper, 4)
    nums = {k: float(v) for k, v in monitor.epoch_values().items()}
    health = monitor.end_epoch(nums, epoch=1, first_batch=0, lr_history=[1e-2])
    assert (health.skipped, health.spikes, health.event) == (0, 0, None)
    assert monitor.guard.interval_log() is None  # a new interval began


def test_mid_epoch_checks_fall_every_n_steps_and_read_the_interval():
    monitor, table, clipper = _monitor(check_every=3)
    assert [monitor.check_due(s) for s in range(1, 7)] == [False, False, True] * 2
    assert not _monitor()[0].check_due(3)  # None: at the epoch's end only
    assert monitor.check(1, 0, [1e-2]) is None  # no step yet
    monitor.snapshot()
    _steps(monitor, table, clipper, 3)
    assert monitor.check(1, 0, [1e-2]) is None and monitor.guard.interval_log() is None


def test_state_round_trips_into_a_fresh_monitor():
    monitor, table, clipper = _monitor()
    monitor.snapshot()
    _steps(monitor, table, clipper, 2)
    monitor.recovery.rollbacks = 2
    state = monitor.state_dict()
    fresh, fresh_table, _ = _monitor(seed=1)
    fresh.guard.load_state_dict(monitor.guard.state_dict())  # per rank, loaded by RankState
    fresh.load_state_dict(state)
    assert fresh.rollbacks == 2 and fresh.has_snapshot
    assert_same(fresh.state_dict(), state)
    fresh.recovery._restore()
    assert_same(save_parts(fresh_table)[ck.MODEL_KEY], monitor.recovery._snapshot[ck.MODEL_KEY])

"""The run's parts (engine/parts.py): a switched-off feature is a no-op with the same methods,
and the table every checkpoint is made of."""

import torch

from _helpers import make_loaders, make_model
from advanced_training_utils import checkpoint as ck
from advanced_training_utils.engine import distributed
from advanced_training_utils.engine.averaging import EMA, SWA, NoAverage
from advanced_training_utils.engine.config import TrainConfig
from advanced_training_utils.engine.parts import (
    NoEarlyStopping,
    NoSchedule,
    RunEarlyStopping,
    build_parts,
    identity,
)
from advanced_training_utils.engine.state import PROGRESS, NoState
from advanced_training_utils.scheduler import LearningRateScheduler

CE = torch.nn.CrossEntropyLoss()


def _parts(**options):
    tl, vl = make_loaders(n=32)
    cfg = TrainConfig.from_options(device="cpu", verbose=False, **options)
    ctx = distributed.setup(torch.device("cpu"), cfg.dist_timeout)
    return build_parts(make_model(), tl, vl, CE, cfg, torch.device("cpu"), ctx)


def test_no_schedule_never_steps_and_scales_the_lrs_for_a_rollback():
    opt = torch.optim.SGD([torch.zeros(2, requires_grad=True)], lr=0.1)
    opt.add_param_group({"params": [torch.zeros(1, requires_grad=True)], "lr": 0.4})
    sched = NoSchedule(opt)
    assert sched.interval == "never" and not sched.is_plateau
    sched.step(1.0)
    sched.scale_lr(0.5)
    assert [g["lr"] for g in opt.param_groups] == [0.05, 0.2]
    assert sched.state_dict() is None


def test_no_early_stopping_never_stops_and_identity_is_the_batch_itself():
    early = NoEarlyStopping()
    assert [early.step(v) for v in (1.0, 2.0, 3.0, float("nan"))] == [False] * 4
    assert not early.should_stop and early.state_dict() is None
    x, y = torch.randn(3), torch.tensor([1, 0, 2])
    out = identity(x, y)
    assert out[0] is x and out[1] is y


def test_switched_off_features_are_no_ops_in_the_parts_and_the_table():
    p = _parts(use_scheduler=False, early_stop_patience=None, use_augmentation=False)
    assert isinstance(p.scheduler, NoSchedule) and p.steps.scheduler is p.scheduler
    assert isinstance(p.early, NoEarlyStopping) and p.table[ck.EARLY_STOPPING_KEY] is p.early
    assert p.steps.augment is identity
    assert isinstance(p.table[ck.AUGMENTATION_KEY], NoState)
    assert isinstance(p.table[ck.MIXING_KEY], NoState)
    # no weight averaging: the loop's per-step hook is NoAverage's empty method
    assert isinstance(p.steps.average, NoAverage) and p.table[ck.EMA_KEY] is p.steps.average
    assert isinstance(p.table[ck.SWA_KEY], NoAverage) and isinstance(p.eval_average, NoAverage)


def test_switched_on_averages_are_in_the_table_the_snapshot_and_the_loop():
    p = _parts(ema_decay=0.99, swa_start=1, eval_ema=True)
    assert isinstance(p.steps.average, EMA) and p.table[ck.EMA_KEY] is p.ema is p.steps.average
    assert isinstance(p.swa, SWA) and p.table[ck.SWA_KEY] is p.swa is p.eval_average
    assert p.monitor.recovery.parts[ck.EMA_KEY] is p.ema
    assert p.monitor.recovery.parts[ck.SWA_KEY] is p.swa
    assert _parts(ema_decay=0.99, eval_ema=True).eval_average.kind == "ema"


def test_switched_on_features_are_the_real_objects():
    p = _parts(use_scheduler=True, scheduler_type="plateau", early_stop_patience=3,
               use_augmentation=True, augment="audio")
    assert isinstance(p.scheduler, LearningRateScheduler) and p.scheduler.is_plateau
    assert isinstance(p.early, RunEarlyStopping) and p.early.patience == 3
    assert p.steps.augment is not identity
    assert p.table[ck.AUGMENTATION_KEY].state_dict() is not None


def test_the_table_lists_every_part_once_with_the_monitor_last():
    p = _parts()
    assert list(p.table) == [
        ck.MODEL_KEY, ck.OPTIMIZER_KEY, ck.SCHEDULER_KEY, ck.PRECISION_KEY, ck.CLIPPER_KEY,
        ck.EMA_KEY, ck.SWA_KEY,
        ck.EARLY_STOPPING_KEY, ck.AUGMENTATION_KEY, ck.MIXING_KEY, PROGRESS, ck.EPOCH_ORDER_KEY,
        ck.CONFIG_KEY, ck.OPTIMIZER_SPEC_KEY, ck.CLASS_WEIGHTS_KEY, ck.RECOVERY_KEY]
    assert p.table[ck.MODEL_KEY] is p.model and p.table[ck.RECOVERY_KEY] is p.monitor
    assert p.table[PROGRESS] is p.progress and p.table[ck.OPTIMIZER_KEY] is p.optimizer
    # recovery's snapshot is the first seven parts of the same table (the averages included)
    assert list(p.monitor.recovery.parts) == list(p.table)[:7]
    assert all(p.monitor.recovery.parts[k] is p.table[k] for k in list(p.table)[:7])

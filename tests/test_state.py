"""The table of stateful parts (engine/state.py): round trips into fresh objects, a new part in
one line, the progress at the top level of the file, and format-1 checkpoints written by the
code before the redesign (tests/fixtures/v1, see make_v1_checkpoints.py) still resuming."""

import math
import shutil
from pathlib import Path

import pytest
import torch

from _helpers import make_loaders, make_model
from advanced_training_utils import checkpoint as ck
from advanced_training_utils import train_model_advanced
from advanced_training_utils.clipping import GradientClipper
from advanced_training_utils.engine.parts import NoSchedule, RunEarlyStopping
from advanced_training_utils.engine.state import (
    PROGRESS,
    Fixed,
    KeepSettings,
    NoState,
    RunProgress,
    load_parts,
    save_parts,
)
from advanced_training_utils.precision import MixedPrecisionTrainer
from advanced_training_utils.scheduler import LearningRateScheduler

FIXTURES = Path(__file__).parent / "fixtures" / "v1"
CE = torch.nn.CrossEntropyLoss()
#: The options of make_v1_checkpoints.py (pct_start: its default then; restore_best_weights=False
#: so the run ends with its last weights, which the fixture holds).
V1_OPTIONS = dict(epochs=2, learning_rate=1e-2, model_name="v1", seed=0,
                  checkpoint_every_n_steps=4, keep_last=8, use_scheduler=True,
                  scheduler_type="cosine", gradient_clip=1.0, device="cpu", verbose=False,
                  pct_start=0.3, restore_best_weights=False)


def assert_same(a, b, where="state"):
    """Equal nested states: tensors bit-exact (torch.equal), floats equal or both NaN."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), f"{where}: keys {list(a)} {list(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), where
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _trained_table(seed=0):
    """A table whose parts all moved away from their initial state (3 optimizer steps)."""
    model = make_model(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = LearningRateScheduler(opt, "cosine", T_max=10, warmup_steps=2)
    precision = MixedPrecisionTrainer(enabled=False, device="cpu")
    clipper = GradientClipper(0.5)
    early = RunEarlyStopping(patience=3)
    x, y = torch.randn(8, 8, 6), torch.randint(0, 3, (8,))
    for value in (1.0, 0.9, 0.95):
        opt.zero_grad()
        CE(model(x), y).backward()
        clipper.clip(model)
        opt.step()
        sched.step()
        early.step(value)
    progress = RunProgress(history=[{"epoch": 1}], epoch=3, step=2, global_step=20,
                           check_from=1, best_loss=0.9, best_epoch=2)
    return {ck.MODEL_KEY: model, ck.OPTIMIZER_KEY: opt, ck.SCHEDULER_KEY: sched,
            ck.PRECISION_KEY: precision, ck.CLIPPER_KEY: KeepSettings(clipper, "max_norm"),
            ck.EARLY_STOPPING_KEY: early, PROGRESS: progress}


def _fresh_table(seed=1):
    model = make_model(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return {ck.MODEL_KEY: model, ck.OPTIMIZER_KEY: opt,
            ck.SCHEDULER_KEY: LearningRateScheduler(opt, "cosine", T_max=10, warmup_steps=2),
            ck.PRECISION_KEY: MixedPrecisionTrainer(enabled=False, device="cpu"),
            ck.CLIPPER_KEY: KeepSettings(GradientClipper(0.5), "max_norm"),
            ck.EARLY_STOPPING_KEY: RunEarlyStopping(patience=3), PROGRESS: RunProgress()}


# ---------------------------------------------------------------- the table
def test_round_trip_into_fresh_objects_is_exact():
    saved = save_parts(_trained_table())
    fresh = _fresh_table()
    assert not torch.equal(fresh[ck.MODEL_KEY][1].weight, _trained_table()[ck.MODEL_KEY][1].weight)
    load_parts(fresh, saved)
    assert_same(save_parts(fresh), saved)
    assert fresh[ck.EARLY_STOPPING_KEY].num_bad_epochs == 1
    assert fresh[ck.SCHEDULER_KEY].step_count == 3


def test_the_progress_keys_are_top_level_keys_of_the_file():
    saved = save_parts(_trained_table())
    assert PROGRESS not in saved
    assert (saved[ck.EPOCH_KEY], saved[ck.STEP_KEY], saved[ck.GLOBAL_STEP_KEY],
            saved[ck.CHECK_FROM_KEY]) == (3, 2, 20, 1)
    assert saved[ck.BEST_KEY] == {"val_loss": 0.9, "epoch": 2, "weights": "model"}
    assert saved[ck.HISTORY_KEY] == [{"epoch": 1}]


def test_adding_a_part_is_one_line_and_it_is_saved_and_restored():
    class Counter:
        def __init__(self):
            self.n = 0

        def state_dict(self):
            return {"n": self.n}

        def load_state_dict(self, state):
            self.n = state["n"]

    table = _trained_table()
    table["counter"] = Counter()  # the one line
    table["counter"].n = 7
    saved = save_parts(table)
    assert saved["counter"] == {"n": 7}
    fresh = {**_fresh_table(), "counter": Counter()}
    load_parts(fresh, saved)
    assert fresh["counter"].n == 7


def test_a_part_saved_off_or_absent_is_left_as_it_is():
    table = _trained_table()
    saved = save_parts({**table, ck.SCHEDULER_KEY: NoSchedule(table[ck.OPTIMIZER_KEY]),
                        ck.AUGMENTATION_KEY: NoState()})
    assert saved[ck.SCHEDULER_KEY] is None and saved[ck.AUGMENTATION_KEY] is None
    fresh = _fresh_table()
    before = fresh[ck.SCHEDULER_KEY].state_dict()
    del saved[ck.EARLY_STOPPING_KEY]  # a checkpoint older than the part
    load_parts(fresh, saved)
    assert_same(fresh[ck.SCHEDULER_KEY].state_dict(), before)
    assert fresh[ck.EARLY_STOPPING_KEY].num_bad_epochs == 0


def test_keep_settings_loads_the_state_under_this_runs_settings():
    old, new = GradientClipper(5.0), GradientClipper(1.0)
    old.clip(_with_grads())
    KeepSettings(new, "max_norm").load_state_dict(old.state_dict())
    assert new.max_norm == 1.0
    assert new.get_stats() == old.get_stats()


def _with_grads():
    model = make_model(0)
    CE(model(torch.randn(4, 8, 6)), torch.tensor([0, 1, 2, 0])).backward()
    return model


def test_run_early_stopping_resumes_its_count_under_the_new_patience():
    saved = RunEarlyStopping(patience=5)
    for v in (1.0, 2.0, 2.0, 2.0):
        saved.step(v)
    resumed = RunEarlyStopping(patience=2, min_delta=0.1)
    resumed.load_state_dict(saved.state_dict())
    assert (resumed.patience, resumed.min_delta, resumed.num_bad_epochs) == (2, 0.1, 3)
    assert resumed.should_stop and not saved.should_stop


def test_fixed_values_are_saved_and_loading_changes_nothing():
    part = Fixed({"lr": 0.1})
    assert save_parts({"config": part}) == {"config": {"lr": 0.1}}
    load_parts({"config": part}, {"config": {"lr": 0.2}})
    assert part.value == {"lr": 0.1}


def test_run_progress_of_a_format_1_file_without_the_newer_keys():
    progress = RunProgress()
    progress.load_state_dict({ck.HISTORY_KEY: [], ck.EPOCH_KEY: 1, ck.STEP_KEY: 2,
                              ck.BEST_KEY: {"val_loss": 1.5, "epoch": 1}})
    assert (progress.global_step, progress.check_from, progress.best_loss) == (0, 2, 1.5)
    progress.load_state_dict({ck.HISTORY_KEY: [], ck.EPOCH_KEY: 2, ck.STEP_KEY: 0,
                              ck.BEST_KEY: {"val_loss": 1.5, "epoch": 1}, ck.CHECK_FROM_KEY: 4})
    assert progress.check_from == 0  # at an epoch's end no recovery interval is open


# ---------------------------------------------------------------- the file the run writes
def test_a_run_checkpoint_holds_exactly_the_tables_keys(tmp_path):
    tl, vl = make_loaders(n=32)
    train_model_advanced(make_model(), tl, vl, CE, epochs=1, checkpoint_dir=tmp_path,
                         model_name="m", device="cpu", verbose=False)
    state = ck.load_checkpoint(tmp_path / "m_last.pt")
    assert set(state) == {
        ck.MODEL_KEY, ck.OPTIMIZER_KEY, ck.SCHEDULER_KEY, ck.PRECISION_KEY, ck.CLIPPER_KEY,
        ck.EARLY_STOPPING_KEY, ck.AUGMENTATION_KEY, ck.MIXING_KEY, ck.HISTORY_KEY, ck.EPOCH_KEY,
        ck.STEP_KEY, ck.BEST_KEY, ck.GLOBAL_STEP_KEY, ck.CHECK_FROM_KEY, ck.EPOCH_ORDER_KEY,
        ck.CONFIG_KEY, ck.OPTIMIZER_SPEC_KEY, ck.RECOVERY_KEY, ck.RANKS_KEY, ck.FORMAT_KEY,
        ck.CHECKSUM_KEY,
        ck.CLASS_WEIGHTS_KEY, ck.EMA_KEY, ck.SWA_KEY}
    assert state[ck.FORMAT_KEY] == 1
    assert list(state[ck.RANKS_KEY][0]) == [ck.RNG_KEY, ck.EPOCH_SUMS_KEY, ck.GUARD_KEY,
                                            ck.LOADER_RNG_KEY]
    # switched-off parts are saved as None, as in every format-1 file
    assert state[ck.EARLY_STOPPING_KEY] is None and state[ck.AUGMENTATION_KEY] is None
    assert state[ck.EPOCH_ORDER_KEY] is None and state[ck.RANKS_KEY][0][ck.EPOCH_SUMS_KEY] is None
    assert state[ck.CLASS_WEIGHTS_KEY] is None
    assert state[ck.EMA_KEY] is None and state[ck.SWA_KEY] is None


# ---------------------------------------------------------------- format 1 from the old code
def _resume(tmp_path, source, **options):
    d = tmp_path / "run"
    d.mkdir(parents=True)
    shutil.copy(source, d / "v1_last.pt")
    torch.manual_seed(0)
    tl, vl = make_loaders()
    model = make_model()
    res = train_model_advanced(model, tl, vl, CE, checkpoint_dir=d, resume=True,
                               **{**V1_OPTIONS, **options})
    return model, res, ck.load_checkpoint(d / "v1_last.pt")


def test_v1_mid_epoch_checkpoint_resumes_to_the_old_codes_weights(tmp_path):
    """The pre-redesign code wrote v1_mid.pt in epoch 2 and v1_epoch.pt at its end; resuming
    the first with today's code ends on the second's weights, bit for bit (same data order
    from the saved epoch order and RNG states, same arithmetic)."""
    want = ck.load_checkpoint(FIXTURES / "v1_epoch.pt")
    mid = ck.load_checkpoint(FIXTURES / "v1_mid.pt")
    assert (mid[ck.EPOCH_KEY], mid[ck.STEP_KEY]) == (1, 2) and ck.GLOBAL_STEP_KEY not in mid
    model, res, last = _resume(tmp_path, FIXTURES / "v1_mid.pt")
    for k, v in want[ck.MODEL_KEY].items():
        assert torch.equal(model.state_dict()[k], v), k
    assert_same(last[ck.OPTIMIZER_KEY]["state"], want[ck.OPTIMIZER_KEY]["state"])
    assert res["history"][0] == want[ck.HISTORY_KEY][0]
    assert res["history"][1]["train_loss"] == want[ck.HISTORY_KEY][1]["train_loss"]
    assert res["history"][1]["val_loss"] == want[ck.HISTORY_KEY][1]["val_loss"]


def test_v1_epoch_checkpoint_continues_like_a_checkpoint_of_todays_code(tmp_path):
    """v1_epoch.pt (no optimizer spec, global step, loader generators or recovery snapshot)
    continues for a third epoch exactly as today's checkpoint of the same point does."""
    torch.manual_seed(0)
    tl, vl = make_loaders()
    today = tmp_path / "today"
    model = make_model()
    train_model_advanced(model, tl, vl, CE, checkpoint_dir=today, **V1_OPTIONS)
    old = ck.load_checkpoint(FIXTURES / "v1_epoch.pt")
    for k, v in old[ck.MODEL_KEY].items():  # today's code wrote the same epoch 2
        assert torch.equal(model.state_dict()[k], v), k
    m_old, res_old, last_old = _resume(tmp_path / "a", FIXTURES / "v1_epoch.pt", epochs=3)
    m_new, res_new, last_new = _resume(tmp_path / "b", today / "v1_last.pt", epochs=3)
    assert [h["epoch"] for h in res_old["history"]] == [1, 2, 3] and res_old["epochs_run"] == 3
    assert math.isfinite(res_old["history"][2]["train_loss"])
    assert res_old["history"][:2] == old[ck.HISTORY_KEY]  # the old rows, as the old code wrote
    # epoch 3's row as from today's checkpoint (the old rows lack keys added since, such as
    # nonfinite_val_examples; epoch 3 is written by today's code in both runs)
    assert ({k: v for k, v in res_old["history"][2].items() if k != "seconds"}
            == {k: v for k, v in res_new["history"][2].items() if k != "seconds"})
    for k in (ck.MODEL_KEY, ck.OPTIMIZER_KEY, ck.SCHEDULER_KEY, ck.CLIPPER_KEY):
        assert_same(last_old[k], last_new[k], k)
    steps = [s["step"] for s in last_old[ck.OPTIMIZER_KEY]["state"].values()]
    assert all(float(s) == 18 for s in steps)  # 6 optimizer steps per epoch, 3 epochs


@pytest.mark.parametrize("name", ["v1_epoch.pt", "v1_mid.pt"])
def test_v1_fixtures_are_intact_format_1_files(name):
    state = ck.load_checkpoint(FIXTURES / name)
    assert state[ck.FORMAT_KEY] == ck.FORMAT_VERSION == 1

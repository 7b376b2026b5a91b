"""engine/batchfind.py and engine/memtrack.py: the batch-size finder and the CPU memory tracker;
app/batchsize.py: batch_size='auto' in advtrain train, and resume reusing the recorded choice."""

import random

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from advanced_training_utils import train_model_advanced
from advanced_training_utils.app import batchsize
from advanced_training_utils.app.cli import main
from advanced_training_utils.app.tasks import Task
from advanced_training_utils.engine.batchfind import (
    BatchSizeResult,
    choose_micro_batch,
    find_batch_size,
    longest_first,
    recorded_choice,
)
from advanced_training_utils.engine.config import TrainConfig
from advanced_training_utils.engine.memtrack import StorageTracker, storage_bytes

QUIET = dict(device="cpu", verbose=False, handle_signals=False)


# ---------------------------------------------------------------------------- the tracker
def test_tracker_peak_equals_a_hand_count_for_linear_forward_backward():
    lin = nn.Linear(16, 8, bias=False)   # W [8, 16]
    x = torch.randn(32, 16)              # created before: not counted
    with StorageTracker() as t:
        y = lin(x)         # mm -> [32, 8] float32: 1024 B (W.t() is a view: 0 B)
        loss = y.sum()     # 0-d: 4 B
        loss.backward()    # seed ones_like 0-d: 4 B (expanded: a view); dL/dW [8, 16]: 512 B
        during = t.live_bytes
        del y, loss
        after = t.live_bytes
    assert t.peak_bytes == 1024 + 4 + 4 + 512
    assert during == 1024 + 4 + 512      # the seed is freed once backward is done
    assert after == 512                  # W.grad only
    assert lin.weight.grad.untyped_storage().nbytes() == 512


def test_views_in_place_and_base_bytes_are_not_new_memory():
    a = torch.zeros(100)
    with StorageTracker(base_bytes=storage_bytes([a, a[10:], a.view(10, 10)])) as t:
        b = a.view(10, 10)
        a.add_(1)
        c = a[5:]
        torch.add(a, 1, out=a)
    assert (b.untyped_storage().nbytes(), c.numel()) == (400, 95)
    assert t.peak_bytes == t.live_bytes == 400   # the base alone: a's storage, once


def test_tracker_raises_out_of_memory_when_the_budget_with_headroom_is_exceeded():
    with StorageTracker(budget_bytes=4400, headroom=0.1):
        torch.empty(1000)                         # 4000 x 1.1 = 4400: fits
    with pytest.raises(torch.OutOfMemoryError, match="memory_budget"):
        with StorageTracker(budget_bytes=4399, headroom=0.1):
            torch.empty(1000)


# ---------------------------------------------------------------------------- the choice
@pytest.mark.parametrize("target, largest, expected", [
    (64, 64, (64, 1)), (64, 40, (32, 2)), (64, 31, (16, 4)), (60, 40, (30, 2)), (7, 6, (1, 7)),
    (12, 5, (4, 3)), (1, 1, (1, 1)),
])
def test_the_micro_batch_is_the_largest_fitting_divisor(target, largest, expected):
    micro, accum = choose_micro_batch(target, largest)
    assert (micro, accum) == expected and micro * accum == target and micro <= largest


def _wide(seed=0, hidden=2048):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, hidden), nn.ReLU(), nn.Linear(hidden, 2))


def _hand_steps(model, data, size, budget):
    """Two optimizer steps of two micro-batches of ``size`` (as the finder probes a size below
    the target), by hand, under the tracker with ``budget`` (None: no limit); the peak."""
    opt = torch.optim.AdamW(model.parameters())
    resident = [*model.parameters()]
    with StorageTracker(base_bytes=storage_bytes(resident), budget_bytes=budget,
                        headroom=0.1) as t:
        for _ in range(2):
            opt.zero_grad(set_to_none=True)
            for _ in range(2):
                x, y = data[:size]
                nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    for p in model.parameters():
        p.grad = None
    return t.peak_bytes


def test_with_a_cpu_budget_the_chosen_batch_fits_and_twice_it_does_not():
    data = TensorDataset(torch.randn(128, 32), torch.randint(0, 2, (128,)))
    model = _wide()
    p16, p32 = _hand_steps(model, data, 16, None), _hand_steps(model, data, 32, None)
    budget = int(1.1 * (p16 + p32) / 2)          # between 16 and 32, with the 10 % headroom
    r = find_batch_size(model, data, nn.CrossEntropyLoss(), target_batch_size=64,
                        memory_budget=budget, gradient_clip=None, recovery=False, **QUIET)
    assert (r.micro_batch_size, r.accumulation_steps) == (16, 4) and 16 <= r.largest_fitting < 32
    assert r.micro_batch_size * r.accumulation_steps == r.target_batch_size == 64
    b = r.micro_batch_size
    _hand_steps(model, data, b, budget)           # fits: no error
    with pytest.raises(torch.OutOfMemoryError):
        _hand_steps(model, data, 2 * b, budget)
    rows = {(p.phase, p.batch_size): p for p in r.probes}
    assert rows["train", b].fits and not rows["train", 2 * b].fits
    assert rows["train", b].peak_bytes * 1.1 <= budget == r.budget_bytes
    assert r.val_batch_size > b                   # validation affords more (no saved activations)


def test_the_effective_batch_is_kept_one_step_equals_one_big_batch():
    torch.manual_seed(1)
    x, y = torch.randn(48, 32, dtype=torch.float64), torch.randint(0, 2, (48,))
    data = TensorDataset(x, y)
    budget = int(1.1 * (_hand_steps(_wide().double(), data, 8, None)
                        + _hand_steps(_wide().double(), data, 16, None)) / 2)
    r = find_batch_size(_wide().double(), data, nn.CrossEntropyLoss(), target_batch_size=48,
                        memory_budget=budget, gradient_clip=None, recovery=False, **QUIET)
    assert r.accumulation_steps > 1 and r.micro_batch_size * r.accumulation_steps == 48
    common = dict(epochs=1, use_scheduler=False, gradient_clip=None, learning_rate=0.1, **QUIET)
    small, big = _wide(3).double(), _wide(3).double()
    train_model_advanced(small, DataLoader(data, batch_size=r.micro_batch_size), None,
                         nn.CrossEntropyLoss(), accumulation_steps=r.accumulation_steps,
                         batch_size_choice=r.record(), **common)
    train_model_advanced(big, DataLoader(data, batch_size=48), None, nn.CrossEntropyLoss(),
                         **common)
    for a, b in zip(small.parameters(), big.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert not torch.equal(small[0].weight, _wide(3).double()[0].weight)  # one step was taken


# ---------------------------------------------------------------------------- OOM and errors
class _Fails(nn.Module):
    """Raises ``error`` for a batch larger than ``above`` (an OOM injected at a size)."""

    def __init__(self, above, error):
        super().__init__()
        self.lin, self.above, self.error = nn.Linear(4, 2), above, error

    def forward(self, x):
        if x.shape[0] > self.above:
            raise self.error
        return self.lin(x)


def test_out_of_memory_is_caught_and_the_search_finds_the_boundary():
    data = TensorDataset(torch.randn(64, 4), torch.randint(0, 2, (64,)))
    model = _Fails(10, torch.OutOfMemoryError("CUDA out of memory (injected)"))
    r = find_batch_size(model, data, nn.CrossEntropyLoss(), target_batch_size=40,
                        memory_budget=1 << 30, **QUIET)
    assert (r.largest_fitting, r.micro_batch_size, r.accumulation_steps) == (10, 10, 4)
    assert r.val_batch_size == 10
    sizes = [p.batch_size for p in r.probes if p.phase == "train"]
    assert sizes == [40, 2, 4, 8, 16, 12, 10, 11]   # target, doubling, then binary search


@pytest.mark.parametrize("error", [RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"),
                                   KeyError("not a memory error")])
def test_other_errors_propagate_even_when_their_message_says_out_of_memory(error):
    data = TensorDataset(torch.randn(64, 4), torch.randint(0, 2, (64,)))
    with pytest.raises((RuntimeError, ValueError, KeyError)) as info:
        find_batch_size(_Fails(10, error), data, nn.CrossEntropyLoss(), target_batch_size=40,
                        memory_budget=1 << 30, **QUIET)
    assert not isinstance(info.value, torch.OutOfMemoryError)


def test_nothing_fits_is_an_out_of_memory_error_and_no_budget_on_cpu_is_refused():
    data = TensorDataset(torch.randn(8, 4), torch.randint(0, 2, (8,)))
    with pytest.raises(torch.OutOfMemoryError, match="batch of 1 does not fit"):
        find_batch_size(nn.Linear(4, 2), data, nn.CrossEntropyLoss(), target_batch_size=4,
                        memory_budget=100, **QUIET)
    with pytest.raises(ValueError, match="memory_budget= .bytes. is required on device 'cpu'"):
        find_batch_size(nn.Linear(4, 2), data, nn.CrossEntropyLoss(), target_batch_size=4,
                        **QUIET)


# ---------------------------------------------------------------------------- longest items
class _Clips(torch.utils.data.Dataset):
    """Variable-length clips ``[4, T_i]`` with a label."""

    def __init__(self, lengths):
        self.lengths = lengths

    def __len__(self):
        return len(self.lengths)

    def __getitem__(self, i):
        return torch.randn(4, self.lengths[i]), torch.tensor(i % 2)


def _pad(items):
    longest = max(x.shape[-1] for x, _ in items)
    xs = [nn.functional.pad(x, (0, longest - x.shape[-1])) for x, _ in items]
    return torch.stack(xs), torch.stack([y for _, y in items])


class _Seen(nn.Module):
    """Records (training?, batch, length) of every forward."""

    def __init__(self):
        super().__init__()
        self.lin, self.seen = nn.Linear(4, 2), []

    def forward(self, x):
        self.seen.append((self.training, x.shape[0], x.shape[-1]))
        return self.lin(x.mean(-1))


def test_longest_clips_are_probed_for_training_and_validation_separately():
    train, val = _Clips([5, 40, 7, 33, 40, 2]), _Clips([9, 120, 3])
    assert longest_first(train) == [1, 4, 3, 2, 0, 5]
    model = _Seen()
    r = find_batch_size(model, train, nn.CrossEntropyLoss(), target_batch_size=2,
                        val_dataset=val, memory_budget=1 << 30, collate_fn=_pad, **QUIET)
    train_lengths = {t for training, n, t in model.seen if training and n > 1}
    val_lengths = {t for training, n, t in model.seen if not training}
    assert train_lengths == {40} and val_lengths == {120}
    assert [(p.phase, p.batch_size) for p in r.probes] == [("train", 2), ("val", 2), ("val", 3)]
    assert (r.micro_batch_size, r.val_batch_size) == (2, 3)


# ---------------------------------------------------------------------------- state restored
def test_model_optimizer_and_rngs_are_restored():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Dropout(0.5), nn.Linear(16, 2))
    model.eval()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    data = TensorDataset(torch.randn(32, 8), torch.randint(0, 2, (32,)))
    nn.functional.cross_entropy(model(data[:4][0]), data[:4][1]).backward()
    opt.step()  # momentum buffers exist; gradients held
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad.clone() for p in model.parameters()]
    opt_before = {k: v["momentum_buffer"].clone() for k, v in enumerate(opt.state.values())}
    random.seed(5)
    np.random.seed(5)
    rng = torch.get_rng_state()
    r = find_batch_size(model, data, nn.CrossEntropyLoss(), target_batch_size=8, optimizer=opt,
                        memory_budget=1 << 30, **QUIET)
    assert r.micro_batch_size == 8
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert all(torch.equal(v["momentum_buffer"], opt_before[k])
               for k, v in enumerate(opt.state.values()))
    assert not model.training and torch.equal(torch.get_rng_state(), rng)
    assert (random.random(), np.random.rand()) == (random.Random(5).random(),
                                                   np.random.RandomState(5).rand())


# ---------------------------------------------------------------------------- options, record
def test_batch_size_choice_option_is_checked_and_recorded():
    rec = BatchSizeResult(16, 4, 64, 20, 128, 10**6, 0.1, 900, 800, "cpu").record()
    assert TrainConfig.from_options(batch_size_choice=rec, accumulation_steps=4).to_plain()[
        "batch_size_choice"] == rec
    with pytest.raises(ValueError, match="batch_size_choice has accumulation_steps=4 but "
                                         "accumulation_steps=1: pass accumulation_steps=4"):
        TrainConfig.from_options(batch_size_choice=rec)
    with pytest.raises(ValueError, match="micro_batch_size x accumulation_steps = 48, not "
                                         "target_batch_size 64"):
        TrainConfig.from_options(batch_size_choice={**rec, "micro_batch_size": 12},
                                 accumulation_steps=4)
    with pytest.raises(TypeError, match="batch_size_choice must be None or a dict"):
        TrainConfig.from_options(batch_size_choice={"micro_batch_size": 2})
    assert BatchSizeResult.from_record(rec).record() == rec


@pytest.mark.parametrize("text, expected", [("2GiB", 2 * 1024**3), ("1.5 GB", 1_500_000_000),
                                            ("512MiB", 512 * 1024**2), (4096, 4096),
                                            ("100", 100), ("3 kib", 3072)])
def test_parse_bytes(text, expected):
    assert batchsize.parse_bytes(text) == expected


@pytest.mark.parametrize("bad", ["2 gigs", "-1GB", "", 0, 1.5])
def test_parse_bytes_refuses_naming_the_option(bad):
    with pytest.raises((ValueError, TypeError), match="memory_budget"):
        batchsize.parse_bytes(bad)


@pytest.mark.parametrize("sets, message", [
    (["batch_size=auto"], "batch_size='auto' on device 'cpu' needs memory_budget"),
    (["batch_size=auto", "memory_budget=lots"], "memory_budget must be bytes or a number"),
    (["batch_size=0"], "batch_size must be >= 1"),
])
def test_cli_auto_without_a_cpu_budget_is_one_error_line_before_any_work(tmp_path, capsys,
                                                                        sets, message):
    argv = ["train", "--task", "notes", "--device", "cpu", "--out", str(tmp_path / "r")]
    assert main([*argv, *[a for s in sets for a in ("--set", s)]]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "r").exists()


def _tiny_task():
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(40, 32), torch.randint(0, 2, (40,)))
    val = TensorDataset(torch.randn(12, 32), torch.randint(0, 2, (12,)))
    return Task("tiny", _wide(0, hidden=256), DataLoader(data, batch_size=8, shuffle=True),
                DataLoader(val, batch_size=4), None, nn.CrossEntropyLoss(), lambda *a: {}, {})


def test_resume_reuses_the_recorded_choice_without_probing(tmp_path, monkeypatch):
    task, opts = _tiny_task(), {"batch_size": "auto", "memory_budget": "1MiB"}
    options = dict(epochs=1, seed=0, **QUIET)
    chosen = batchsize.apply_auto(task, options, opts, 8, tmp_path, "tiny", resume=False)
    assert chosen["batch_size_choice"]["target_batch_size"] == 8
    assert task.train_loader.batch_size == chosen["batch_size_choice"]["micro_batch_size"]
    train_model_advanced(task.model, task.train_loader, task.val_loader, task.criterion,
                         checkpoint_dir=tmp_path, model_name="tiny", **chosen)
    assert recorded_choice(tmp_path, "tiny").record() == chosen["batch_size_choice"]

    def no_probe(*args, **kwargs):
        raise AssertionError("probed again on resume")

    monkeypatch.setattr(batchsize, "find_batch_size", no_probe)
    task2 = _tiny_task()
    again = batchsize.apply_auto(task2, {**options, "epochs": 2}, opts, 8, tmp_path, "tiny",
                                 resume=True)
    assert again["batch_size_choice"] == chosen["batch_size_choice"]
    assert again["accumulation_steps"] == chosen["accumulation_steps"]
    assert task2.val_loader.batch_size == chosen["batch_size_choice"]["val_batch_size"]
    res = train_model_advanced(task2.model, task2.train_loader, task2.val_loader,
                               task2.criterion, checkpoint_dir=tmp_path, model_name="tiny",
                               resume=True, **again)
    assert res["epochs_run"] == 2
    with pytest.raises(ValueError, match="kept an effective batch of 8, this one asks for 16"):
        batchsize.apply_auto(_tiny_task(), {**options, "accumulation_steps": 2}, opts, 8,
                             tmp_path, "tiny", resume=True)

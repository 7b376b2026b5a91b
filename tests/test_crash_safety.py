"""Crash safety: exact mid-epoch resume, kill -9, SIGTERM, corrupted checkpoints, full disks."""

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _helpers import Boom, crashing, make_data, make_model
from advanced_training_utils import CheckpointError, load_checkpoint, train_model_advanced
from advanced_training_utils import checkpoint as ck
from advanced_training_utils.checkpoint import checkpoint_chain

CE = torch.nn.CrossEntropyLoss()
WORKER = Path(__file__).with_name("crash_worker.py")
ROOT = Path(__file__).resolve().parents[1]




class CountingDataset(torch.utils.data.Dataset):
    def __init__(self, base):
        self.base, self.reads = base, 0

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        self.reads += 1
        return self.base[i]


def _loaders(ds=None):
    ds = ds if ds is not None else make_data(96)
    return (torch.utils.data.DataLoader(ds, batch_size=8, shuffle=True),
            torch.utils.data.DataLoader(make_data(32, seed=5), batch_size=16))


OPTS = dict(epochs=3, learning_rate=3e-3, device="cpu", verbose=False, seed=0,
            use_augmentation=True, augment="emotion", augment_options={"noise_level": 0.05},
            restore_best_weights=False, model_name="m")




def _dropout_model(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 32), torch.nn.ReLU(),
                               torch.nn.Dropout(0.3), torch.nn.Linear(32, 3))


@pytest.mark.parametrize("crash_at", [5, 14, 27])  # mid-epoch, near an epoch end, epoch 3
def test_mid_epoch_resume_is_bit_exact(tmp_path, crash_at):
    tl, vl = _loaders()
    ref = _dropout_model(1)
    r_ref = train_model_advanced(ref, tl, vl, CE, checkpoint_dir=tmp_path / "ref", **OPTS)

    m = _dropout_model(1)
    with pytest.raises(Boom):
        train_model_advanced(m, tl, vl, crashing(crash_at), checkpoint_dir=tmp_path / "c",
                             checkpoint_every_n_steps=1, **OPTS)
    resumed = _dropout_model(7)
    r = train_model_advanced(resumed, tl, vl, CE, checkpoint_dir=tmp_path / "c", resume=True,
                             checkpoint_every_n_steps=1, **OPTS)
    for a, b in zip(ref.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    strip = lambda h: [{k: v for k, v in e.items() if k != "seconds"} for e in h]  # noqa: E731
    assert strip(r["history"]) == strip(r_ref["history"])


def test_resume_cost_does_not_grow_with_position(tmp_path):
    reads = {}
    for frac, at in (("10%", 2), ("90%", 11)):  # 12 batches per epoch; crash in epoch 1
        ds = CountingDataset(make_data(96))
        tl, vl = _loaders(ds)
        with pytest.raises(Boom):
            train_model_advanced(_dropout_model(1), tl, vl, crashing(at),
                                 checkpoint_dir=tmp_path / frac, checkpoint_every_n_steps=1,
                                 **{**OPTS, "epochs": 1})
        ds.reads = 0
        train_model_advanced(_dropout_model(1), tl, vl, CE, checkpoint_dir=tmp_path / frac,
                             resume=True, checkpoint_every_n_steps=1, **{**OPTS, "epochs": 1})
        reads[frac] = ds.reads
    # Only the remaining batches are loaded (no peek at start-up: the first-batch checks run on
    # the batch the epoch reads).
    assert reads["10%"] == 96 - 8 * 1
    assert reads["90%"] == 96 - 8 * 10


def test_truncated_bitflipped_zero_length_fall_back(tmp_path, caplog):
    tl, vl = _loaders()
    train_model_advanced(make_model(1), tl, vl, CE, checkpoint_dir=tmp_path, keep_last=3,
                         **{**OPTS, "epochs": 3})
    chain = checkpoint_chain(tmp_path / "m_last.pt", 3)
    assert all(p.exists() for p in chain)
    assert [load_checkpoint(p)["epoch"] for p in chain] == [3, 2, 1]
    data = chain[0].read_bytes()
    chain[0].write_bytes(data[: len(data) // 3])             # truncated
    b = bytearray(chain[1].read_bytes())
    w = load_checkpoint(chain[1])["model"]["1.weight"].numpy().tobytes()
    at = bytes(b).find(w)
    assert at > 0
    b[at + len(w) // 2] ^= 0x01                               # one bit flipped in the weights
    chain[1].write_bytes(bytes(b))
    with pytest.raises(CheckpointError):
        load_checkpoint(chain[0])
    with pytest.raises(CheckpointError):
        load_checkpoint(chain[1])
    m = make_model(2)
    res = train_model_advanced(m, tl, vl, CE, checkpoint_dir=tmp_path, keep_last=3, resume=True,
                               **{**OPTS, "epochs": 3})
    assert "falling back to the newest intact checkpoint" in caplog.text
    assert res["epochs_run"] == 3  # resumed after epoch 1, ran 2 and 3 again
    # zero-length files: also skipped (_best.pt, a complete checkpoint, is a candidate too)
    for p in chain + [tmp_path / "m_best.pt"]:
        p.write_bytes(b"")
    with pytest.raises(CheckpointError, match="no intact checkpoint"):
        train_model_advanced(make_model(2), tl, vl, CE, checkpoint_dir=tmp_path, keep_last=3,
                             resume=True, **OPTS)


def test_keep_last_retention(tmp_path):
    tl, vl = _loaders()
    train_model_advanced(make_model(1), tl, vl, CE, checkpoint_dir=tmp_path, keep_last=2,
                         checkpoint_every_n_steps=4, **OPTS)
    names = sorted(p.name for p in tmp_path.glob("m_last*.pt"))
    assert names == ["m_last.1.pt", "m_last.pt"]
    assert not list(tmp_path.glob("*.tmp"))


def test_unwritable_checkpoint_dir_fails_before_training(tmp_path):
    if os.geteuid() == 0:
        target = tmp_path / "file"
        target.write_text("x")  # a file where the folder should be: fails for root too
        bad = target / "sub"
    else:
        bad = tmp_path / "ro"
        bad.mkdir()
        bad.chmod(0o500)
    tl, vl = _loaders()
    with pytest.raises((CheckpointError, OSError)):
        train_model_advanced(make_model(1), tl, vl, CE, checkpoint_dir=bad, **OPTS)


def test_failed_writes_keep_previous_and_stop_after_three(tmp_path, monkeypatch, caplog):
    import errno

    from faults import FileFaults, temp_files

    tl, vl = _loaders()
    # The second checkpoint write hits a full disk (at the lowest level: os.write).
    faults = FileFaults(tmp_path).fail("write", ".m_last.pt.*.tmp", errno.ENOSPC, nth=2)
    faults.install(monkeypatch)
    res = train_model_advanced(make_model(1), tl, vl, CE, checkpoint_dir=tmp_path,
                               **{**OPTS, "keep_last": 1})
    assert faults.fired
    assert res["epochs_run"] == 3 and "checkpoint write failed" in caplog.text
    assert load_checkpoint(tmp_path / "m_last.pt")["epoch"] == 3
    assert temp_files(tmp_path) == []

    full = tmp_path / "full"
    FileFaults(full).fail("write", ".m_last.pt.*.tmp", errno.ENOSPC, always=True
                          ).install(monkeypatch)
    with pytest.raises(CheckpointError, match="3 checkpoint writes failed in a row"):
        train_model_advanced(make_model(1), tl, vl, CE, checkpoint_dir=full,
                             **{**OPTS, "epochs": 5})
    assert temp_files(full) == []


# ------------------------------------------------------------------ subprocesses
def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _spawn(out, *extra):
    return subprocess.Popen([sys.executable, str(WORKER), str(out), "--epochs", "8", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=_env())


def _run_until(proc, lines):
    """Read ``lines`` progress lines (or until the process ends)."""
    for _ in range(lines):
        if not proc.stdout.readline():
            return False
    return True


def _final(out):
    return torch.load(out / "final.pt", weights_only=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    p = _spawn(out)
    assert p.wait(timeout=120) == 0
    return _final(out)


def test_kill_9_at_random_points_then_resume_is_bit_exact(tmp_path, reference):
    rng = random.Random(1234)
    kills = 0
    while kills < 5:
        p = _spawn(tmp_path)
        if _run_until(p, rng.randint(1, 30)):
            p.send_signal(signal.SIGKILL)
            p.wait(timeout=60)
            kills += 1
        else:
            p.wait(timeout=60)
            break
    p = _spawn(tmp_path)
    assert p.wait(timeout=120) == 0
    got = _final(tmp_path)
    assert kills == 5
    for k in reference:
        assert torch.equal(got[k], reference[k]), k


def test_sigterm_checkpoints_exits_143_and_resumes_exactly(tmp_path, reference):
    """SIGTERM during criterion call 40: epoch 1 is 24 training + 3 validation calls, so the
    signal lands in epoch 2's 13th training batch. Without step checkpoints (``--every 0``) the
    only mid-epoch checkpoint is the one the signal makes: after that step, and not later."""
    p = _spawn(tmp_path, "--every", "0", "--sigterm-at", "40")
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 128 + signal.SIGTERM
    assert out.splitlines()[-1] == "batch 40 train"  # no criterion call after the signal's step
    state = load_checkpoint(tmp_path / "w_last.pt")
    assert (state[ck.EPOCH_KEY], state[ck.STEP_KEY]) == (1, 13)  # 1 epoch done, 13 batches
    p = _spawn(tmp_path)
    assert p.wait(timeout=120) == 0
    got = _final(tmp_path)
    for k in reference:
        assert torch.equal(got[k], reference[k]), k

"""One run per checkpoint folder and model name; a dead run's lock never blocks."""

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _helpers import make_loaders, make_model
from advanced_training_utils import CheckpointError, TrainConfig, train_model_advanced
from advanced_training_utils.engine.runfiles import RunFiles
from advanced_training_utils.engine.runlock import RunLock, RunLockedError

ROOT = Path(__file__).resolve().parents[1]
OPTS = dict(epochs=1, device="cpu", verbose=False, model_name="m")
HOLD = ("import sys, time; from advanced_training_utils.engine.runlock import RunLock; "
        "RunLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(120)")


def _cfg(folder, name="m"):
    return TrainConfig.from_options(checkpoint_dir=str(folder), model_name=name)


def test_second_run_in_the_same_folder_fails_naming_the_first(tmp_path):
    first = RunFiles(_cfg(tmp_path))
    pattern = rf"pid {os.getpid()} on host {socket.gethostname()}"
    with pytest.raises(RunLockedError, match=pattern):
        RunFiles(_cfg(tmp_path))
    RunFiles(_cfg(tmp_path, "other")).close()  # another model_name: its own lock
    first.close()
    RunFiles(_cfg(tmp_path)).close()  # released by close()


def test_only_the_main_rank_locks(tmp_path):
    a, b = RunFiles(_cfg(tmp_path), is_main=False), RunFiles(_cfg(tmp_path), is_main=False)
    assert a.lock is None and b.lock is None and not (tmp_path / "m.lock").exists()


def test_lock_released_when_training_fails_before_the_first_epoch(tmp_path):
    tl, vl = make_loaders()
    with pytest.raises(CheckpointError):  # resume=path of a missing file
        train_model_advanced(make_model(), tl, vl, torch.nn.CrossEntropyLoss(),
                             checkpoint_dir=tmp_path, resume=str(tmp_path / "nope.pt"), **OPTS)
    train_model_advanced(make_model(), tl, vl, torch.nn.CrossEntropyLoss(),
                         checkpoint_dir=tmp_path, **OPTS)


def test_other_process_holds_the_lock_then_dies(tmp_path):
    """A live holder: fail fast naming its pid and host. After kill -9 the kernel has dropped
    the flock, and the next run proceeds (the stale lock file is reused)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "m.lock")],
                         stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert p.stdout.readline().strip() == "locked"
        tl, vl = make_loaders()
        with pytest.raises(RunLockedError, match=rf"pid {p.pid} on host "
                                                 rf"{socket.gethostname()}.*model_name"):
            train_model_advanced(make_model(), tl, vl, torch.nn.CrossEntropyLoss(),
                                 checkpoint_dir=tmp_path, **OPTS)
        assert not list(tmp_path.glob("m_*.pt"))  # nothing was written
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
    res = train_model_advanced(make_model(), tl, vl, torch.nn.CrossEntropyLoss(),
                               checkpoint_dir=tmp_path, **OPTS)
    assert res["epochs_run"] == 1


def test_lock_file_symlink_is_refused(tmp_path):
    target = tmp_path / "victim"
    target.write_bytes(b"precious")
    os.symlink(target, tmp_path / "x.lock")
    with pytest.raises(CheckpointError, match="symlink"):
        RunLock(tmp_path / "x.lock").acquire()
    assert target.read_bytes() == b"precious"

import os

import pytest
import torch

from advanced_training_utils import CheckpointError, load_checkpoint, save_checkpoint
from advanced_training_utils.checkpoint import (
    CHECKSUM_KEY,
    FORMAT_KEY,
    MODEL_KEY,
    capture_rng,
    restore_rng,
)


def _payload():
    m = torch.nn.Linear(4, 3)
    return {MODEL_KEY: m.state_dict(), "epoch": 3, "history": [{"loss": 1.0}]}


def test_round_trip_and_plain_weights_only_load(tmp_path):
    p = save_checkpoint(tmp_path / "a.pt", _payload())
    obj = load_checkpoint(p)
    assert obj["epoch"] == 3 and obj[FORMAT_KEY] == 1
    assert obj[CHECKSUM_KEY].startswith("crc32:") and len(obj[CHECKSUM_KEY]) == 14
    raw = torch.load(p, weights_only=True)
    assert torch.equal(raw[MODEL_KEY]["weight"], obj[MODEL_KEY]["weight"])
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_truncated_file_detected(tmp_path):
    p = save_checkpoint(tmp_path / "a.pt", _payload())
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"a\.pt: unreadable, truncated or corrupted"):
        load_checkpoint(p)


def test_zero_length_file_detected(tmp_path):
    p = tmp_path / "a.pt"
    p.write_bytes(b"")
    with pytest.raises(CheckpointError, match="file is empty"):
        load_checkpoint(p)


def test_bit_flip_in_tensor_data_detected(tmp_path):
    p = save_checkpoint(tmp_path / "a.pt", _payload())
    ref = load_checkpoint(p)
    data = bytearray(p.read_bytes())
    # Flip a bit inside the stored weight bytes (found by searching for them).
    w = ref[MODEL_KEY]["weight"].numpy().tobytes()
    at = bytes(data).find(w)
    assert at > 0
    data[at + 5] ^= 0x10
    p.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum mismatch|unreadable"):
        load_checkpoint(p)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_checkpoint(tmp_path / "nope.pt")


class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_malicious_checkpoint_is_refused_and_runs_nothing(tmp_path):
    target = tmp_path / "pwned"
    p = tmp_path / "evil.pt"
    torch.save({"model": _Evil(target)}, p)
    with pytest.raises(CheckpointError, match="refused unsafe content"):
        load_checkpoint(p)
    assert not target.exists()


def test_failed_write_keeps_previous_file(tmp_path, monkeypatch):
    p = save_checkpoint(tmp_path / "a.pt", _payload())
    before = p.read_bytes()

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(p, {**_payload(), "epoch": 4})
    monkeypatch.undo()
    assert p.read_bytes() == before
    assert load_checkpoint(p)["epoch"] == 3
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_rng_round_trip(tmp_path):
    import random

    import numpy as np

    state = capture_rng()
    save_checkpoint(tmp_path / "r.pt", {"rng": state})
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    restore_rng(load_checkpoint(tmp_path / "r.pt")["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a

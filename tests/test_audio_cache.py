import logging
import os
from pathlib import Path

import numpy as np
import pytest

from advanced_training_utils.app.audio.cache import FeatureCache, feature_cache_dir


class Counter:
    """A compute function that counts its calls and returns a value derived from the file."""

    def __init__(self, path):
        self.path, self.calls = path, 0

    def __call__(self):
        self.calls += 1
        data = Path(self.path).read_bytes()
        return {"mel": np.frombuffer(data, dtype=np.uint8).astype(np.float32)[None, :],
                "samples": np.array(len(data))}


@pytest.fixture
def audio_file(tmp_path):
    path = tmp_path / "a.wav"
    path.write_bytes(b"abcdef")
    return path


def test_miss_then_hit(tmp_path, audio_file):
    cache, compute = FeatureCache(tmp_path / "c"), Counter(audio_file)
    first, hit1 = cache.get(audio_file, {"sr": 16000}, compute)
    second, hit2 = cache.get(audio_file, {"sr": 16000}, compute)
    assert (hit1, hit2, compute.calls, cache.hits, cache.misses) == (False, True, 1, 1, 1)
    np.testing.assert_array_equal(first["mel"], second["mel"])
    assert second["mel"].dtype == np.float32 and int(second["samples"]) == 6
    files = [p for p in (tmp_path / "c").rglob("*") if p.is_file()]
    assert len(files) == 1 and files[0].suffix == ".npz"        # no temp file left behind


def test_changed_file_recomputes(tmp_path, audio_file):
    cache, compute = FeatureCache(tmp_path / "c"), Counter(audio_file)
    cache.get(audio_file, {}, compute)
    st = audio_file.stat()
    audio_file.write_bytes(b"abcdeX")                            # same size, new content
    os.utime(audio_file, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    arrays, hit = cache.get(audio_file, {}, compute)
    assert not hit and compute.calls == 2 and arrays["mel"][0, -1] == ord("X")
    audio_file.write_bytes(b"abcdeXY")                           # new size, mtime restored
    os.utime(audio_file, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    assert not cache.get(audio_file, {}, compute)[1] and compute.calls == 3


@pytest.mark.parametrize("changed", [{"sr": 8000}, {"sr": 16000, "n_mels": 40},
                                     {"sr": 16000, "crop": 2.0}])
def test_changed_params_recompute(tmp_path, audio_file, changed):
    cache, compute = FeatureCache(tmp_path / "c"), Counter(audio_file)
    cache.get(audio_file, {"sr": 16000}, compute)
    assert not cache.get(audio_file, changed, compute)[1]
    assert cache.get(audio_file, {"sr": 16000}, compute)[1]     # the old entry is still there
    assert compute.calls == 2


def test_moved_file_is_a_new_key(tmp_path, audio_file):
    cache = FeatureCache(tmp_path / "c")
    other = tmp_path / "b.wav"
    other.write_bytes(audio_file.read_bytes())
    os.utime(other, ns=(audio_file.stat().st_atime_ns, audio_file.stat().st_mtime_ns))
    assert cache.key(audio_file, {}) != cache.key(other, {})


def test_xdg_cache_home_honoured(tmp_path, monkeypatch, audio_file):
    monkeypatch.delenv("ADVTRAIN_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert feature_cache_dir() == tmp_path / "xdg" / "advanced-training-utils" / "features"
    cache = FeatureCache()
    cache.get(audio_file, {}, Counter(audio_file))
    assert len(list((tmp_path / "xdg").rglob("*.npz"))) == 1
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/dir")       # XDG spec: ignore relative paths
    assert feature_cache_dir() == Path.home() / ".cache" / "advanced-training-utils" / "features"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert feature_cache_dir() == Path.home() / ".cache" / "advanced-training-utils" / "features"
    monkeypatch.setenv("ADVTRAIN_CACHE", str(tmp_path / "adv"))  # the package-wide override
    assert feature_cache_dir() == tmp_path / "adv" / "features"


def test_corrupt_entry_is_recomputed_and_replaced(tmp_path, audio_file, caplog):
    cache, compute = FeatureCache(tmp_path / "c"), Counter(audio_file)
    cache.get(audio_file, {}, compute)
    entry = cache.entry(cache.key(audio_file, {}))
    entry.write_bytes(b"PK\x03\x04 truncated")
    with caplog.at_level(logging.WARNING):
        arrays, hit = cache.get(audio_file, {}, compute)
    assert not hit and compute.calls == 2 and "unreadable" in caplog.text
    assert cache.get(audio_file, {}, compute)[1]


def test_write_replaces_a_planted_symlink_not_its_target(tmp_path, audio_file):
    cache = FeatureCache(tmp_path / "c")
    entry = cache.entry(cache.key(audio_file, {}))
    entry.parent.mkdir(parents=True)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    entry.symlink_to(victim)
    cache.get(audio_file, {}, Counter(audio_file))               # the link is not an npz: miss
    assert victim.read_text() == "keep me"
    assert entry.is_file() and not entry.is_symlink()


def test_entries_follow_the_umask(tmp_path, audio_file):
    old = os.umask(0o027)
    try:
        cache = FeatureCache(tmp_path / "c")
        cache.get(audio_file, {}, Counter(audio_file))
    finally:
        os.umask(old)
    mode = cache.entry(cache.key(audio_file, {})).stat().st_mode & 0o777
    assert mode == 0o640


def test_unwritable_cache_still_returns_features(tmp_path, audio_file, caplog):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("")
    cache, compute = FeatureCache(blocker / "c"), Counter(audio_file)
    with caplog.at_level(logging.WARNING):
        a, hit_a = cache.get(audio_file, {}, compute)
        b, hit_b = cache.get(audio_file, {}, compute)
    assert (hit_a, hit_b, compute.calls) == (False, False, 2)
    assert caplog.text.count("not writable") == 1
    np.testing.assert_array_equal(a["mel"], b["mel"])


def test_disabled_cache_computes_every_time_and_writes_nothing(tmp_path, audio_file):
    cache, compute = FeatureCache(tmp_path / "c", enabled=False), Counter(audio_file)
    cache.get(audio_file, {}, compute)
    cache.get(audio_file, {}, compute)
    assert compute.calls == 2 and not (tmp_path / "c").exists()


def test_missing_file_goes_to_compute_which_reports_it(tmp_path):
    cache = FeatureCache(tmp_path / "c")

    def compute():
        raise FileNotFoundError("reported by compute")

    with pytest.raises(FileNotFoundError, match="reported by compute"):
        cache.get(tmp_path / "nope.wav", {}, compute)

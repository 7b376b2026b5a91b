"""Small audio corpora written with soundfile for the audio tests (both layouts, broken files)."""

import struct
from pathlib import Path

import numpy as np
import soundfile as sf

RATES = (8000, 22050, 44100, 16000)
SUBTYPES = ("PCM_16", "PCM_24", "FLOAT")
EMOTIONS = ("angry", "happy", "neutral")


def sine(freq, seconds, rate, channels=1, amp=0.5, phase=0.0):
    """``[T]`` or ``[T, channels]`` float32 sine (channels get different amplitudes)."""
    t = np.arange(int(round(seconds * rate))) / rate
    x = amp * np.sin(2 * np.pi * freq * t + phase)
    if channels == 1:
        return x.astype(np.float32)
    return np.stack([x * (1.0 - 0.3 * c) for c in range(channels)], axis=1).astype(np.float32)


def write_good(path, i, seconds=None, freq=None):
    """The ``i``-th good clip: rate, channels, subtype and length cycle with ``i``."""
    rate = RATES[i % len(RATES)]
    channels = 1 + (i % 2)
    seconds = seconds if seconds is not None else 0.4 + 0.1 * (i % 7)
    freq = freq if freq is not None else 200.0 + 50.0 * (i % 11)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, sine(freq, seconds, rate, channels), rate, subtype=SUBTYPES[i % 3])
    return path


def wav_header(bits, rate=16000, fmt=1, n_bytes=400, channels=1):
    """A RIFF/WAVE header claiming ``bits`` per sample, followed by ``n_bytes`` of data."""
    block = channels * ((bits + 7) // 8 or 1)
    fmt_chunk = struct.pack("<IHHIIHH", 16, fmt, channels, rate, rate * block, block, bits)
    data = bytes(range(256)) * (n_bytes // 256 + 1)
    return (b"RIFF" + struct.pack("<I", 36 + n_bytes) + b"WAVE" + b"fmt " + fmt_chunk
            + b"data" + struct.pack("<I", n_bytes) + data[:n_bytes])


def write_broken(folder):
    """Broken files by kind -> path (the problem each must be reported with)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    good = folder / "_tmp_good.wav"
    sf.write(good, sine(440, 0.3, 16000), 16000, subtype="PCM_16")
    out = {
        "truncated_header": folder / "truncated.wav",
        "random_bytes": folder / "random.wav",
        "empty_file": folder / "empty.wav",
        "zero_length": folder / "zeroframes.wav",
        "silent": folder / "silent.wav",
        "wide_pcm": folder / "pcm48.wav",
    }
    out["truncated_header"].write_bytes(good.read_bytes()[:30])
    good.unlink()
    out["random_bytes"].write_bytes(np.random.default_rng(0).bytes(3000))
    out["empty_file"].write_bytes(b"")
    sf.write(out["zero_length"], np.zeros(0, np.float32), 16000, subtype="PCM_16")
    sf.write(out["silent"], np.zeros(8000, np.float32), 16000, subtype="PCM_16")
    out["wide_pcm"].write_bytes(wav_header(48, n_bytes=4800))
    return out


PROBLEMS = {
    "truncated_header": r"cannot decode: .*data",
    "random_bytes": r"cannot decode: Format not recognised",
    "empty_file": r"empty file \(0 bytes\)",
    "zero_length": r"zero-length clip \(0 samples\)",
    "silent": r"silent \(all samples are zero\)",
    "wide_pcm": r"unsupported format: .*unimplemented",
}


def csv_corpus(root, speakers=6, per_class=2, broken=True, split_of=None, extra=""):
    """``root/labels.csv`` over ``root/wav/*``: speakers x emotions x per_class good clips,
    valence/arousal numbers; ``split_of(speaker) -> str`` adds a split column."""
    root = Path(root)
    rows, i = [], 0
    for s in range(speakers):
        for e, emo in enumerate(EMOTIONS):
            for k in range(per_class):
                rel = f"wav/spk{s}_{emo}_{k}.wav"
                write_good(root / rel, i)
                rows.append((rel, emo, f"{0.1 * e - 0.2:.2f}", f"{0.05 * s:.2f}", f"spk{s}"))
                i += 1
    bad = {}
    if broken:
        bad = write_broken(root / "wav" / "bad")
        for j, path in enumerate(bad.values()):
            rows.append((str(path.relative_to(root)), EMOTIONS[j % 3], "0.0", "0.0", f"spk{j % 6}"))
        rows.append(("wav/bad/missing.wav", "happy", "0.0", "0.0", "spk0"))
    header = "path,emotion,valence,arousal,speaker" + (",split" if split_of else "") + extra
    lines = [header]
    for r in rows:
        line = ",".join(r)
        if split_of:
            line += "," + split_of(r[4])
        lines.append(line)
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root / "labels.csv", bad


def folder_corpus(root, speakers=5, per_class=2, broken=True, splits=None):
    """``root/<class>/spkS_k.wav`` (or ``root/<split>/<class>/...`` when ``splits`` maps a
    speaker to a split name); broken files go into the first class."""
    root = Path(root)
    i = 0
    for s in range(speakers):
        for emo in EMOTIONS:
            for k in range(per_class):
                base = root / splits(s) if splits else root
                write_good(base / emo / f"spk{s}_{k}.wav", i)
                i += 1
    first = (root / splits(0) if splits else root) / EMOTIONS[0]
    (first / "notes.txt").write_text("not audio, ignored")
    bad = write_broken(first) if broken else {}
    return root, bad

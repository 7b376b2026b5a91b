"""Extract the four-part Bach chorales of the music21 corpus into a compact .npz (dev only).

Needs ``pip install music21`` (the corpus ships inside the package and loads offline). Writes
``src/advanced_training_utils/app/data/bach_chorales.npz``; the package itself needs only numpy.

Arrays (one row per note, sorted by piece, voice, onset):
  note_piece, note_voice (0 soprano .. 3 bass), note_onset, note_duration (16th-note units),
  note_pitch (MIDI).
Per piece: piece_name (corpus file stem, e.g. 'bwv1.6'), piece_mode (1 major, 0 minor),
  piece_tonic (pitch class 0-11), piece_meter_num, piece_meter_den, piece_length (16ths),
  piece_melody (id shared by chorales whose soprano tune is the same).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

VOICES = ("soprano", "alto", "tenor", "bass")
OUT = Path(__file__).resolve().parents[1] / "src/advanced_training_utils/app/data/bach_chorales.npz"


def _voice_parts(score):
    found = {}
    for part in score.parts:
        name = (part.partName or "").strip().lower()
        for i, v in enumerate(VOICES):
            if name.startswith(v) and i not in found:
                found[i] = part
    return found if len(found) == 4 else None


def _melody_key(notes, tonic):
    """The soprano's first 12 pitches relative to the tonic (pitch classes) and their rhythm."""
    sop = [(on, p) for (v, on, _d, p) in notes if v == 0][:12]
    return tuple((p - tonic) % 12 for _on, p in sop)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    from music21 import corpus

    rows, pieces, melodies = [], [], {}
    for path in sorted(corpus.getComposer("bach")):
        try:
            score = corpus.parse(path)
        except Exception as e:  # a few corpus files are not chorales or fail to parse
            print(f"skip {path.name}: {e}", file=sys.stderr)
            continue
        parts = _voice_parts(score)
        if parts is None:
            continue
        ts = score.recurse().getElementsByClass("TimeSignature")
        if not ts:
            continue
        key = score.analyze("key")
        tonic = key.tonic.pitchClass
        notes = []
        ok = True
        for v, part in sorted(parts.items()):
            for n in part.stripTies().flatten().notes:
                on, dur = float(n.offset) * 4, float(n.quarterLength) * 4
                if on != int(on) or dur != int(dur) or dur <= 0:
                    ok = False  # off the 16th grid (grace notes, tuplets): skip piece
                    break
                notes.append((v, int(on), int(dur), max(p.midi for p in n.pitches)))
            if not ok:
                break
        if not ok or not notes:
            continue
        mk = _melody_key(notes, tonic)
        melody = melodies.setdefault(mk, len(melodies))
        idx = len(pieces)
        pieces.append((path.stem.replace(".mxl", ""), int(key.mode == "major"), tonic,
                       ts[0].numerator, ts[0].denominator,
                       int(max(on + d for _v, on, d, _p in notes)), melody))
        rows.extend((idx, *n) for n in notes)
    a = np.array(rows, dtype=np.int32)
    names = np.array([p[0] for p in pieces])
    meta = np.array([p[1:] for p in pieces], dtype=np.int32)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        args.out,
        note_piece=a[:, 0].astype(np.int16), note_voice=a[:, 1].astype(np.int8),
        note_onset=a[:, 2].astype(np.int16), note_duration=a[:, 3].astype(np.int16),
        note_pitch=a[:, 4].astype(np.int8),
        piece_name=names, piece_mode=meta[:, 0].astype(np.int8),
        piece_tonic=meta[:, 1].astype(np.int8), piece_meter_num=meta[:, 2].astype(np.int8),
        piece_meter_den=meta[:, 3].astype(np.int8), piece_length=meta[:, 4].astype(np.int16),
        piece_melody=meta[:, 5].astype(np.int16),
    )
    print(f"{len(pieces)} chorales, {len(a)} notes, {len(melodies)} melodies -> {args.out} "
          f"({args.out.stat().st_size // 1024} KB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

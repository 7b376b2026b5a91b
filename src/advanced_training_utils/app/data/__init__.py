"""Built-in data: Bach chorales -> emotion clips and emotion-to-notes pairs."""

from ..audio.logmel import LogMel, mel_filterbank
from .chorales import Chorales, load_chorales
from .datasets import (
    EMOTION_CLASSES,
    EMOTION_VARIANTS,
    chorale_windows,
    emotion_clips,
    emotion_dataset,
    notes_dataset,
    training_subset,
)
from .render import render_notes
from .timbres import TIMBRES, Timbre

__all__ = ["EMOTION_CLASSES", "EMOTION_VARIANTS", "TIMBRES", "Chorales", "LogMel", "Timbre",
           "chorale_windows", "emotion_clips", "emotion_dataset", "load_chorales",
           "mel_filterbank", "notes_dataset", "render_notes", "training_subset"]

"""Built-in data: Bach chorales -> emotion clips and emotion-to-notes pairs."""

from ..audio.logmel import LogMel, mel_filterbank
from .chorales import Chorales, load_chorales
from .datasets import (
    EMOTION_CLASSES,
    chorale_windows,
    emotion_clips,
    emotion_dataset,
    notes_dataset,
)
from .render import render_notes

__all__ = ["EMOTION_CLASSES", "Chorales", "LogMel", "chorale_windows", "emotion_clips",
           "emotion_dataset", "load_chorales", "mel_filterbank", "notes_dataset", "render_notes"]

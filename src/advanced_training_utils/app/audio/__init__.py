"""Train on your own audio: decode (soundfile), resample (soxr), log-mel (cached), datasets.

Needs the ``audio`` extra (``pip install advanced-training-utils[audio]``).
"""

from .cache import FeatureCache, feature_cache_dir
from .datasets import (
    AudioDataset,
    AudioFolderDataset,
    AudioSplits,
    CsvAudioDataset,
    load_audio_splits,
)
from .decode import AUDIO_EXTENSIONS, AudioError, load_audio
from .features import FeatureExtractor
from .logmel import CHORALE_PARAMS, LogMel, mel_filterbank
from .options import AudioOptions
from .sampler import EpochSampler
from .splits import carve_val, grouped_split

__all__ = [
    "AUDIO_EXTENSIONS",
    "CHORALE_PARAMS",
    "AudioDataset",
    "AudioError",
    "AudioFolderDataset",
    "AudioOptions",
    "AudioSplits",
    "CsvAudioDataset",
    "EpochSampler",
    "FeatureCache",
    "FeatureExtractor",
    "LogMel",
    "carve_val",
    "feature_cache_dir",
    "grouped_split",
    "load_audio",
    "load_audio_splits",
    "mel_filterbank",
]

"""advanced-training-utils: training utilities for audio-emotion and emotion-to-music models.

This module only re-exports the public API; each name lives in a module of its own. The audio
datasets (``load_audio_splits``, ``CsvAudioDataset``...) decode files with the ``audio`` extra
(soundfile, soxr), imported when the first file is read.
"""

from . import _version
from .app.audio import (
    AudioDataset,
    AudioFolderDataset,
    AudioSplits,
    CsvAudioDataset,
    EpochSampler,
    LogMel,
    load_audio_splits,
)
from .augmentation import SPECAUGMENT_POLICIES, DataAugmentation
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .clipping import GradientClipper
from .early_stopping import EarlyStopping
from .engine.batchfind import BatchSizeResult, find_batch_size
from .engine.config import TrainConfig
from .engine.lrfind import LRFindResult, find_lr
from .engine.options import TrainOptions
from .engine.presets import PRESETS, get_preset
from .engine.run import train_model_advanced
from .mixing import BatchMixing
from .precision import MixedPrecisionTrainer
from .scheduler import SCHEDULER_TYPES, LearningRateScheduler
from .stability import TrainingStability

#: The installed version (package metadata), ``"0+unknown"`` when run from an uninstalled tree.
__version__ = _version.package_version()

__all__ = [
    "PRESETS",
    "SCHEDULER_TYPES",
    "SPECAUGMENT_POLICIES",
    "AudioDataset",
    "AudioFolderDataset",
    "AudioSplits",
    "BatchMixing",
    "BatchSizeResult",
    "CheckpointError",
    "CsvAudioDataset",
    "DataAugmentation",
    "EarlyStopping",
    "EpochSampler",
    "GradientClipper",
    "LRFindResult",
    "LearningRateScheduler",
    "LogMel",
    "MixedPrecisionTrainer",
    "TrainConfig",
    "TrainOptions",
    "TrainingStability",
    "find_batch_size",
    "find_lr",
    "get_preset",
    "load_audio_splits",
    "load_checkpoint",
    "save_checkpoint",
    "train_model_advanced",
    "__version__",
]

"""advanced-training-utils: training utilities for audio-emotion and emotion-to-music models.

This module only re-exports the public API; each name lives in a module of its own.
"""

from . import _version
from .augmentation import SPECAUGMENT_POLICIES, DataAugmentation
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .clipping import GradientClipper
from .config import TrainConfig
from .early_stopping import EarlyStopping
from .precision import MixedPrecisionTrainer
from .presets import PRESETS, get_preset
from .scheduler import SCHEDULER_TYPES, LearningRateScheduler
from .stability import TrainingStability
from .train import train_model_advanced

#: The installed version (package metadata), ``"0+unknown"`` when run from an uninstalled tree.
__version__ = _version.package_version()

__all__ = [
    "PRESETS",
    "SCHEDULER_TYPES",
    "SPECAUGMENT_POLICIES",
    "CheckpointError",
    "DataAugmentation",
    "EarlyStopping",
    "GradientClipper",
    "LearningRateScheduler",
    "MixedPrecisionTrainer",
    "TrainConfig",
    "TrainingStability",
    "get_preset",
    "load_checkpoint",
    "save_checkpoint",
    "train_model_advanced",
    "__version__",
]

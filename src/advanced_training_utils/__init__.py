"""advanced-training-utils: training utilities for audio-emotion and emotion-to-music models.

This module only re-exports the public API; each name lives in a module of its own.
"""

from .augmentation import SPECAUGMENT_POLICIES, DataAugmentation
from .clipping import GradientClipper
from .early_stopping import EarlyStopping
from .precision import MixedPrecisionTrainer
from .scheduler import SCHEDULER_TYPES, LearningRateScheduler
from .stability import TrainingStability

__version__ = "0.1.0"

__all__ = [
    "SCHEDULER_TYPES",
    "SPECAUGMENT_POLICIES",
    "DataAugmentation",
    "EarlyStopping",
    "GradientClipper",
    "LearningRateScheduler",
    "MixedPrecisionTrainer",
    "TrainingStability",
    "__version__",
]

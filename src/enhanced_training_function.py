"""Compatibility import path used by the user's guide.

``from enhanced_training_function import train_model_advanced`` works exactly like
``from advanced_training_utils import train_model_advanced``.
"""

from advanced_training_utils.engine.run import train_model_advanced

__all__ = ["train_model_advanced"]

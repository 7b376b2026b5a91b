"""Applications built on the engine: the ``advtrain`` CLI, its built-in tasks, models and data.

Layer 3 of the package: it may import the engine and the utilities; nothing imports it except
``python -m advanced_training_utils`` and the ``advtrain`` console script.
"""

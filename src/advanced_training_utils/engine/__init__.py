"""The training engine: ``train_model_advanced`` and the rooms it is built from.

Layer 2 of the package. It builds on the guide's utilities at the package root (scheduler,
clipping, precision, augmentation, stability, early stopping, checkpoint format, metrics) and
never imports :mod:`advanced_training_utils.app`. Public names are re-exported by the package
root; import from the modules here only for internals.
"""

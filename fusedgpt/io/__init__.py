"""File IO below both the model and training: atomic writes and verified checkpoints.

Imports point down only (kernels <- model <- train <- cli); this package imports none of
them, so the model can read checkpoints without depending on the training code.
"""

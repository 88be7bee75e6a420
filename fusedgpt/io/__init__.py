"""File IO below both the model and training: atomic writes and verified checkpoints
(:mod:`atomic`, :mod:`checkpoint`), append-only logs that survive a torn last line
(:mod:`jsonl`), one writer per run directory (:mod:`runlock`) and the record of what a
command wrote into its output directory (:mod:`written`).

Imports point down only (kernels <- model <- train <- cli); this package imports none of
them, so the model can read checkpoints without depending on the training code.
"""

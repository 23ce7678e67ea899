"""Operator-norm passive filter pruning (and baselines) of ConvNeXt checkpoints.

criteria.py  scorers over one producer weight (registry CRITERIA)
scoring.py   group scores (per-producer normalisation, reduction) and keep rules
costs.py     params / MACs of a shape and of candidate prunings
surgery.py   cut state dicts and rewrite checkpoints
prune_convnext.py  the command-line tool
"""

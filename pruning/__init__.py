"""Pruning of checkpoints of every model family, one stage per module:

    checkpoint -> arch -> groups -> scores -> plan -> surgery -> checkpoint

models.infer_arch / the checkpoint's `arch`, then models.channel_groups (each family's own file)
criteria.py     scorers over one tensor (registry CRITERIA)
calibration.py  training batches through the model: the data taylor / activation score
scoring.py      group scores (rows per producer or per slice, normalisation, reduction)
plan.py         keep rules: which channels of every group survive
costs.py        fast params / MACs of candidate plans (exact counts: models.count_arch)
surgery.py      cut state dicts and rewrite checkpoints
prune.py        the command-line tool (prune_convnext.py: the same tool under its first name)

Studies built on prune.py's stages: study.py (shared), sensitivity.py, iterative.py and
scripts/compare_criteria.py.
"""

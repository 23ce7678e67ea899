"""Pruning of checkpoints of every model family, one stage per module:

    checkpoint -> arch -> groups -> scores -> plan -> surgery -> checkpoint

models.infer_arch / the checkpoint's `arch`, then models.channel_groups (each family's own file)
criteria.py     Criterion objects in one registry (register_criterion), Aggregation
spec.py         the typed settings: KeepRules, Calibration, PruneSpec
calibration.py  training batches through the model: the evidence data-driven criteria read
scoring.py      group scores (rows per producer, slice, scale or input; normalisation, reduction)
plan.py         keep rules: which channels of every group survive
costs.py        fast params / MACs of candidate plans (exact counts: models.count_arch)
surgery.py      cut state dicts and rewrite checkpoints
compensate.py   optional fit of the pruned model's norms (and their readers) to the dense model
api.py          prune(source, spec) -> Result: the stages above in one call
diagnosis.py    what a cut did to every norm's statistics; probe.py: the hooks it and compensate.py use

The entry scripts here (prune.py, its alias prune_convnext.py, diagnose.py, sensitivity.py,
iterative.py) run their modules in cli/; studies/ holds the studies built on api.py.
"""
from .criteria import CRITERIA, Aggregation, Criterion, get_criterion, register_criterion
from .spec import Calibration, KeepRules, PruneSpec

_API = ("prune", "load", "open_source", "calibrate", "Result", "Source", "Evidence")


def __getattr__(name):
    """The api names load torch on first use, so `import pruning` (and every command line's
    --help) does not."""
    if name in _API:
        from . import api
        return getattr(api, name)
    raise AttributeError(f"module 'pruning' has no attribute {name!r}")


__all__ = ["prune", "load", "open_source", "calibrate", "Result", "Source", "Evidence", "PruneSpec", "KeepRules", "Calibration",
           "Aggregation", "Criterion", "CRITERIA", "register_criterion", "get_criterion"]

"""Group scoring: one score per channel of a channel group (docs/design.md section 6).

Each producer of a group is scored with the criterion (a multi-part producer part by part,
the pieces concatenated in channel order), normalised (by its maximum unless --normalize says
otherwise), and the producers are reduced to one score per channel (mean by default);
pruning/plan.py turns the scores into kept channels. Layer scale is folded into the rows of
the producer that carries it (gamma * pwconv2, the weight that actually writes into the
residual stream) unless raw weights are asked for. Criteria that read scale factors
(`slimming`) score the group's `scales` tensors the same way instead of its producers.
"""
import inspect
import zlib
from dataclasses import dataclass, field

import torch

from errors import UserError
from models.groups import part_stop

from .criteria import get_criterion

def _divide_by(stat):
    def normalise(scores):
        peak = stat(scores)
        return scores / peak if peak > 0 else torch.zeros_like(scores)
    return normalise


# How one producer's (or scale tensor's) scores are made comparable before the reduction and
# the global ranking: divided by their max (default), by their mean, or left raw (`none`:
# e.g. network slimming's one global threshold on raw |scale factors|).
NORMALIZATIONS = {
    "max": _divide_by(lambda s: s.max()),
    "mean": _divide_by(lambda s: s.mean()),
    "none": lambda s: s,
}

REDUCTIONS = {
    "mean": lambda s: s.mean(dim=0),
    "sum": lambda s: s.sum(dim=0),
    "max": lambda s: s.max(dim=0).values,
    "first": lambda s: s[0],
}


@dataclass
class GroupScores:
    """Scores of one group: `score` [width] after reduction, `producers` label -> [width]."""
    score: torch.Tensor
    producers: dict = field(default_factory=dict)


def _seed_for(seed, key):
    """A seed derived from a name, stable across runs and Python processes (no hash salt)."""
    return (int(seed) * 1_000_003 + zlib.crc32(key.encode())) % (2 ** 63)


def _call(scorer, tensor, seed, key, seed_key):
    """Run one scorer on one tensor (`key` names it in errors).

    Seeded scorers get a seed derived from `seed_key`: the group name and the part's position,
    so every producer of a group draws the same numbers and the reduction keeps them uniform.
    """
    seeded = "seed" in inspect.signature(scorer).parameters
    kwargs = {"seed": _seed_for(seed, seed_key)} if seeded else {}
    try:
        scores = scorer(tensor, **kwargs)
    except ValueError as e:
        raise UserError(f"cannot score {key}: {e}") from None
    return scores.to(torch.float64)


def _rows(sd, part, width):
    """The rows (group channels [start, stop)) of a producer part, as a tensor with them first."""
    if part.key not in sd:
        raise UserError(f"the checkpoint lacks {part.key}, which its channel groups name")
    t = sd[part.key]
    n = part_stop(part, width) - part.start
    if t.shape[part.axis] != n:
        raise UserError(f"{part.key} has {t.shape[part.axis]} channels on axis {part.axis}, "
                        f"its channel group expects {n}")
    return t.movedim(part.axis, 0)


def score_producer(sd, producer, width, scorer, raw_weights=False, seed=0, seed_key="", normalize="max"):
    """Score one producer's rows, part by part, and normalise them (NORMALIZATIONS).

    Args:
        sd: state dict.
        producer: models.groups.Producer.
        width: channels of the group.
        scorer: a criterion function.
        raw_weights: ignore the producer's scale (score the stored weights as they are).
        seed: base seed for seeded criteria.
        seed_key: name the seeds derive from (the group's name).
        normalize: a key of NORMALIZATIONS.
    Returns:
        [width] float64 scores (with "max": maximum 1, all zeros if every score is 0).
    """
    scale = None
    if producer.scale is not None and not raw_weights:
        scale = sd[producer.scale].detach().to("cpu", torch.float64)
    pieces = []
    for i, part in enumerate(producer.parts):
        rows = _rows(sd, part, width).detach().to("cpu", torch.float64)
        if scale is not None:
            s = scale[part.start:part_stop(part, width)]
            rows = rows * s.reshape(-1, *([1] * (rows.dim() - 1)))
        pieces.append(_call(scorer, rows, seed, part.key, f"{seed_key}#{i}"))
    return NORMALIZATIONS[normalize](torch.cat(pieces))


def _label(producer):
    return "+".join(p.key for p in producer.parts)


def score_group(sd, group, criterion, reduce="mean", raw_weights=False, seed=0, normalize="max"):
    """Score every channel of a group.

    Args:
        sd: state dict (CPU tensors).
        group: models.groups.Group.
        criterion: name of a criterion in pruning.criteria.CRITERIA.
        reduce: how producers are combined: mean, sum, max or first.
        raw_weights: score stored weights without folding in layer scale.
        seed: base seed for seeded criteria (random).
        normalize: how each producer's scores are scaled (NORMALIZATIONS).
    Returns:
        GroupScores, or None when the criterion has nothing to score in this group
        (slimming on a group without scale factors).
    """
    scorer = get_criterion(criterion)
    if reduce not in REDUCTIONS:
        raise UserError(f"unknown reduction {reduce!r}; choose one of {', '.join(REDUCTIONS)}")
    if normalize not in NORMALIZATIONS:
        raise UserError(f"unknown normalisation {normalize!r}; choose one of {', '.join(NORMALIZATIONS)}")
    per = {}
    if getattr(scorer, "uses_scales", False):
        for key in group.scales:
            if key not in sd:
                raise UserError(f"the checkpoint lacks {key}, which its channel groups name")
            per[key] = NORMALIZATIONS[normalize](_call(scorer, sd[key], seed, key, f"{group.name}#0"))
    else:
        for producer in group.producers:
            per[_label(producer)] = score_producer(sd, producer, group.width, scorer, raw_weights,
                                                   seed, group.name, normalize)
    if not per:
        return None
    for label, s in per.items():
        if s.shape != (group.width,):
            raise UserError(f"{label} gives {tuple(s.shape)} scores for group {group.name} "
                            f"of width {group.width}")
    score = REDUCTIONS[reduce](torch.stack(list(per.values())))
    return GroupScores(score=score, producers=per)


def score_groups(sd, groups, criterion, reduce="mean", raw_weights=False, seed=0, normalize="max"):
    """score_group for every group: dict group name -> GroupScores (or None)."""
    return {g.name: score_group(sd, g, criterion, reduce, raw_weights, seed, normalize) for g in groups}

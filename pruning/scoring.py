"""Group scoring: one score per channel of a channel group (docs/design.md section 6).

Every group is scored from a stack of score rows, one per source, each [width] long; which
rows depends on what the criterion reads (criteria.Criterion.reads):
- weights, scope `producers`: one row per producer, scored part by part (the pieces
  concatenated in channel order). Layer scale is folded into the rows of the producer that
  carries it (gamma * pwconv2, the weight that writes into the residual stream) unless raw
  weights are asked for;
- weights, scope `group`: one row per tensor slice the group cuts that holds weights or scale
  factors (producer rows, consumer columns, norm and layer-scale vectors; biases and
  BatchNorm running statistics are not scored), as Torch-Pruning's group magnitude does;
- scales: one row per per-channel scale factor of the group (slimming);
- saliency: the calibration |w * dL/dw| of every slice scope `group` reads (taylor);
- activation: the mean |input| of every layer that reads the group's channels.
Each row is normalised over the channels it covers (Aggregation.normalize), then the rows are
reduced to one score per channel (Aggregation.reduce; a slice that covers only some channels,
a multi-scale branch, counts only there); pruning/plan.py turns the scores into kept channels.
"""
import zlib
from dataclasses import dataclass, field, replace

import torch

from common.errors import UserError
from models.groups import part_rows, part_span, part_stop

from .criteria import NORMALIZATIONS as NORMALIZATION_NAMES
from .criteria import REDUCTIONS as REDUCTION_NAMES
from .criteria import Aggregation, get_criterion


def _divide_by(stat):
    def normalise(scores):
        peak = stat(scores)
        return scores / peak if peak > 0 else torch.zeros_like(scores)
    return normalise


# How one row's scores are made comparable before the reduction and the global ranking:
# divided by their max (default), by their mean, or left raw (`none`: e.g. network slimming's
# one global threshold on raw |scale factors|).
NORMALIZATIONS = {
    "max": _divide_by(lambda s: s.max()),
    "mean": _divide_by(lambda s: s.mean()),
    "none": lambda s: s,
}


def _first(rows):
    """Per channel, the first row that covers it."""
    index = (~torch.isnan(rows)).to(torch.int8).argmax(dim=0)
    return rows.gather(0, index[None])[0]


# Rows are NaN where they do not cover a channel, so every reduction skips those entries.
REDUCTIONS = {
    "mean": lambda s: torch.nanmean(s, dim=0),
    "sum": lambda s: torch.nansum(s, dim=0),
    "max": lambda s: s.nan_to_num(nan=-torch.inf).max(dim=0).values,
    "first": _first,
}
assert tuple(NORMALIZATIONS) == NORMALIZATION_NAMES and tuple(REDUCTIONS) == REDUCTION_NAMES


@dataclass
class GroupScores:
    """Scores of one group: `score` [width] after reduction, `sources` label -> [width] row
    (NaN where the source does not cover a channel)."""
    score: torch.Tensor
    sources: dict = field(default_factory=dict)


def seed_for(seed, key):
    """A seed derived from a name, stable across runs and Python processes (no hash salt)."""
    return (int(seed) * 1_000_003 + zlib.crc32(key.encode())) % (2 ** 63)


def _call(crit, tensor, seed, key, seed_key):
    """Run one criterion's score function on one tensor (`key` names it in errors); its
    result must be one finite, non-negative score per row (higher = kept).

    Seeded criteria get a seed derived from `seed_key`: the group name and the channel offset,
    so every full-width source of a group draws the same numbers and the reduction keeps them
    uniform.
    """
    kwargs = {"seed": seed_for(seed, seed_key)} if crit.seeded else {}
    try:
        result = crit.score(tensor, **kwargs)
    except ValueError as e:
        raise UserError(f"cannot score {key}: {e}") from None
    except Exception as e:  # noqa: BLE001  (a registered criterion is user code: any failure is one line)
        raise UserError(f"criterion {crit.name} failed on {key}: {type(e).__name__}: {e}") from None
    try:
        scores = torch.as_tensor(result).to(torch.float64)
    except (TypeError, RuntimeError, ValueError):
        scores = None
    if scores is None or scores.shape != (tensor.shape[0],):
        got = type(result).__name__ if scores is None else f"shape {tuple(scores.shape)}"
        raise UserError(f"criterion {crit.name} gave {got} for {key}; it must give one score per channel "
                        f"({tensor.shape[0]})")
    if not bool(torch.isfinite(scores).all()) or bool((scores < 0).any()):
        raise UserError(f"criterion {crit.name} gave {'negative' if bool((scores < 0).any()) else 'NaN or infinite'} "
                        f"scores for {key}; scores must be finite and >= 0 (higher = kept: give -s as max - s)")
    return scores


def _rows(tensors, part, width):
    """The rows (group channels [start, stop)) of a tensor slice, with the channels first."""
    if part.key not in tensors:
        raise UserError(f"the checkpoint lacks {part.key}, which its channel groups name")
    t = tensors[part.key]
    if t.shape[part.axis] < part_span(part, width):
        raise UserError(f"{part.key} has {t.shape[part.axis]} channels on axis {part.axis}, "
                        f"its channel group expects {part_span(part, width)}")
    return part_rows(t.detach(), part, width).to("cpu", torch.float64)


def _placed(values, part, width):
    """A [width] row holding `values` at the part's channels and NaN elsewhere."""
    row = torch.full((width,), torch.nan, dtype=torch.float64)
    row[part.start:part_stop(part, width)] = values
    return row


def _normalised(row, normalize):
    covered = ~torch.isnan(row)
    out = row.clone()
    out[covered] = NORMALIZATIONS[normalize](row[covered])
    return out


def _scaled(rows, scale, part, width):
    """Rows (channels first) times the part's share of a per-channel scale (layer scale)."""
    s = scale.detach().to("cpu", torch.float64)[part.start:part_stop(part, width)]
    return rows * s.reshape(-1, *([1] * (rows.dim() - 1)))


def score_producer(sd, producer, width, crit, *, raw_weights=False, seed=0, seed_key=""):
    """Score one producer's rows, part by part, concatenated in channel order (not normalised).

    Args:
        sd: state dict.
        producer: models.groups.Producer.
        width: channels of the group.
        crit: a Criterion that reads weights.
        raw_weights: ignore the producer's scale (score the stored weights as they are).
        seed: base seed for seeded criteria.
        seed_key: name the seeds derive from (the group's name).
    Returns:
        [width] float64 scores.
    """
    pieces = []
    for i, part in enumerate(producer.parts):
        rows = _rows(sd, part, width)
        if producer.scale is not None and not raw_weights:
            rows = _scaled(rows, sd[producer.scale], part, width)
        pieces.append(_call(crit, rows, seed, part.key, f"{seed_key}#{i}"))
    return torch.cat(pieces)


def group_slices(group):
    """The slices `--scope group` and `taylor` score: weights and scale vectors."""
    scales = set(group.scales) | {p.scale for p in group.producers if p.scale}
    return [p for p in group.slices if p.key.endswith(".weight") or p.key in scales]


def _slice_rows(tensors, group, crit, seed, fold_scales):
    """One row per scored slice; with fold_scales, a producer's scale multiplies its rows."""
    scale_of = {part.key: prod.scale for prod in group.producers if prod.scale for part in prod.parts}
    rows = {}
    for part in group_slices(group):
        t = _rows(tensors, part, group.width)
        if fold_scales and part.key in scale_of:
            t = _scaled(t, tensors[scale_of[part.key]], part, group.width)
        t = t.reshape(t.shape[0], -1)  # a 1-D vector becomes [n, 1]: one value per channel
        values = _call(crit, t, seed, part.key, f"{group.name}@{part.start}")
        rows[f"{part.key}[axis {part.axis}]"] = _placed(values, part, group.width)
    return rows


def _activation_rows(activity, group):
    """One row per layer that reads the group's channels, from calibration.input_activity."""
    rows = {}
    for part in group.slices:
        vector = activity.get((part.key, part.axis))
        if vector is not None:
            values = _rows({part.key: vector}, replace(part, axis=0), group.width)
            values = values.reshape(len(values), -1).mean(dim=1)  # a block: its positions' mean
            rows[f"input of {part.key.rsplit('.', 1)[0]}"] = _placed(values, part, group.width)
    return rows


def _source_rows(sd, group, crit, scope, raw_weights, seed, evidence):
    """Label -> [width] row (NaN outside the channels the source covers), not yet normalised."""
    if crit.evidence is not None:
        if evidence is None or crit.evidence not in evidence:
            raise UserError(f"criterion {crit.name} needs calibration data ({crit.evidence} of "
                            "--calib_batches training batches)")
        if crit.reads == "activation":
            return _activation_rows(evidence["activation"], group)
        return _slice_rows(evidence[crit.evidence], group, crit, seed, fold_scales=False)
    if crit.reads == "scales":
        rows = {}
        for key in group.scales:
            if key not in sd:
                raise UserError(f"the checkpoint lacks {key}, which its channel groups name")
            rows[key] = _call(crit, sd[key], seed, key, f"{group.name}#0")
        return rows
    if scope == "group":
        return _slice_rows(sd, group, crit, seed, fold_scales=not raw_weights)
    return {"+".join(p.key for p in prod.parts):
            score_producer(sd, prod, group.width, crit, raw_weights=raw_weights, seed=seed, seed_key=group.name)
            for prod in group.producers}


def aggregation_for(crit, aggregation=None):
    """The aggregation a criterion scores with: `aggregation`'s fields, the rest its defaults;
    UserError for a scope the criterion cannot read."""
    agg = (aggregation or Aggregation()).filled(crit.aggregation)
    if crit.reads != "weights" and agg.scope != crit.aggregation.scope:
        raise UserError(f"criterion {crit.name} reads {crit.reads}: its scope is {crit.aggregation.scope}, "
                        f"not {agg.scope}")
    return agg


def score_group(sd, group, criterion, *, aggregation=None, raw_weights=False, seed=0, evidence=None):
    """Score every channel of a group.

    Args:
        sd: state dict (CPU tensors).
        group: models.groups.Group.
        criterion: a registered name or a criteria.Criterion.
        aggregation: criteria.Aggregation; fields left None take the criterion's defaults
            (the same defaults prune.py uses).
        raw_weights: score stored weights without folding in layer scale.
        seed: base seed of a seeded criterion (random).
        evidence: {"saliency": key -> |w * grad|, "activation": (key, axis) -> [channels]}
            from pruning/calibration.py, for the data-driven criteria.
    Returns:
        GroupScores, or None when the criterion has nothing to score in this group
        (slimming on a group without scale factors).
    """
    crit = get_criterion(criterion)
    agg = aggregation_for(crit, aggregation)
    rows = _source_rows(sd, group, crit, agg.scope, raw_weights, seed, evidence)
    if not rows:
        return None
    for label, s in rows.items():
        if s.shape != (group.width,):
            raise UserError(f"{label} gives {tuple(s.shape)} scores for group {group.name} "
                            f"of width {group.width}")
    rows = {label: _normalised(s, agg.normalize) for label, s in rows.items()}
    score = REDUCTIONS[agg.reduce](torch.stack(list(rows.values())))
    if bool(torch.isnan(score).any()):
        raise UserError(f"criterion {crit.name} leaves channels of {group.name} unscored")
    return GroupScores(score=score, sources=rows)


def score_groups(sd, groups, criterion, **options):
    """score_group for every group (same keyword options): dict group name -> GroupScores or None."""
    return {g.name: score_group(sd, g, criterion, **options) for g in groups}

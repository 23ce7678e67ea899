"""Group scoring: one score per channel of a channel group (docs/design.md section 6).

Each producer of a group is scored with the criterion (a multi-part producer part by part,
the pieces concatenated in channel order), divided by its maximum, and the producers are
reduced to one score per channel (mean by default). Layer scale is folded into the rows of
the producer that carries it (gamma * pwconv2, the weight that actually writes into the
residual stream) unless raw weights are asked for. Criteria that read scale factors
(`slimming`) score the group's `scales` tensors the same way instead of its producers.
"""
import fnmatch
import inspect
import math
import zlib
from dataclasses import dataclass, field

import torch

from errors import UserError

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


def part_stop(part, width):
    """End of a part's channel range (None means the group width)."""
    return width if part.stop is None else part.stop


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


# --- keep rules ----------------------------------------------------------------------------
#
# Ranking inside a group: higher score first; equal scores keep the lower channel index first
# (a stable sort), so all-zero scores keep channels 0..k-1. Kept indices are always sorted.


def ranking(score):
    """Channel indices best first (stable: on equal scores the lower index wins)."""
    return torch.argsort(-score, stable=True)


def required_ranges(group):
    """Channel sub-ranges that must keep at least one channel (multi-scale branches).

    Any slice that covers only part of the group is a separate tensor (a depthwise branch):
    cutting it to zero channels would delete the branch.
    """
    ranges = set()
    for part in group.slices:
        stop = part_stop(part, group.width)
        if part.start > 0 or stop < group.width:
            ranges.add((part.start, stop))
    return sorted(ranges)


def min_width(group):
    """The fewest channels a group can keep: 1, or one per branch range (greedy cover)."""
    return select(group, torch.arange(group.width), 1).numel()


def select(group, order, k):
    """The k best channels by `order`, adjusted so that every required range keeps one.

    Args:
        group: models.groups.Group.
        order: channel indices best first (see `ranking`).
        k: channels wanted (raised when the branch ranges need more).
    Returns:
        sorted 1-D int64 tensor of kept indices.
    """
    ranges = required_ranges(group)
    k = max(int(k), 1)
    if not ranges:
        return torch.sort(order[:k]).values
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel())
    forced = torch.zeros(group.width, dtype=torch.bool)
    while True:
        rest = order[~forced[order]][:max(k - int(forced.sum()), 0)]
        chosen = forced.clone()
        chosen[rest] = True
        missing = next(((a, b) for a, b in ranges if not chosen[a:b].any()), None)
        if missing is None:
            return torch.nonzero(chosen).flatten()
        a, b = missing
        forced[a + int(torch.argmin(rank[a:b]))] = True  # best-ranked channel of the branch


def round_width(k, width, round_to):
    """Round a chosen width up to a multiple of round_to, within [1, width]."""
    k = max(int(k), 1)
    if round_to > 1:
        k = -(-k // round_to) * round_to
    return min(k, width)


@dataclass
class Targets:
    """Global targets, all optional: params <= params, MACs <= macs, kept share <= 1 - ratio."""
    params: int | None = None
    macs: int | None = None
    ratio: float | None = None

    def any(self):
        return any(v is not None for v in (self.params, self.macs, self.ratio))


def _stage_of(groups):
    """Stage index of every group: residual groups in order, hidden groups the stage they precede."""
    stage, out = 0, {}
    for g in groups:
        out[g.name] = stage
        stage += g.kind == "residual"
    return out


def _per_stage(values, n_stages, flag):
    if values is None:
        return None
    values = list(values)
    if len(values) == 1:
        return values * n_stages
    if len(values) != n_stages:
        raise UserError(f"{flag} takes 1 or {n_stages} values (one per stage), got {len(values)}")
    return values


def fixed_widths(groups, dims=None, hidden_ratio=None, round_to=1, mlp_ratio=None, follow_dims=True,
                 group_ratio=None):
    """Widths set explicitly: --dims for residual groups, --hidden_ratio / --mlp_ratio for hidden.

    With --dims alone (and follow_dims), each block's MLP keeps its source ratio to the residual
    width (a 4x MLP stays 4x), so --dims alone gives the Efficient ConvNeXt shapes.

    Args:
        groups: channel groups, in models.channel_groups order.
        dims: target width per residual group (taken exactly as given), or None.
        hidden_ratio: one share, or one per stage, of each block's hidden channels, or None.
        round_to: hidden widths round up to a multiple of this.
        mlp_ratio: one multiple, or one per stage, of the stage's (new) residual width that
            each block's hidden width becomes (4 gives the Efficient ConvNeXt shapes), or None.
        follow_dims: with dims and no hidden rule, scale each MLP with its stage's residual.
        group_ratio: [(glob pattern, share)]: prune that share of every group whose name
            matches (kept = floor((1 - share) x width), as Li et al.'s scripts; 0 leaves the
            group whole); later patterns win, and they override the rules above.
    Returns:
        dict group name -> width, for the groups these rules fix.
    """
    residual = [g for g in groups if g.kind == "residual"]
    widths = {}
    if (dims is not None or mlp_ratio is not None) and not residual:
        raise UserError("--dims / --mlp_ratio: this model has no residual channel groups (its "
                        "streams stay whole); use --group_ratio, --hidden_ratio or a global target")
    if dims is not None:
        dims = list(dims)
        if len(dims) != len(residual):
            raise UserError(f"--dims takes {len(residual)} values for this model "
                            f"(one per stage: {', '.join(g.name for g in residual)}), got {len(dims)}")
        for g, d in zip(residual, dims):
            if d < 1:
                raise UserError(f"--dims: {g.name} would keep {d} channels; at least 1 is needed")
            if d > g.width:
                raise UserError(f"--dims: {g.name} has only {g.width} channels, cannot keep {d}")
            if d < min_width(g):
                raise UserError(f"--dims: {g.name} needs at least {min_width(g)} channels "
                                "to keep every multi-scale branch")
            widths[g.name] = int(d)
    if hidden_ratio is not None and mlp_ratio is not None:
        raise UserError("give --hidden_ratio or --mlp_ratio, not both")
    stage = _stage_of(groups)
    ratios = _per_stage(hidden_ratio, max(len(residual), 1), "--hidden_ratio")
    for r in ratios or ():
        if not 0 < r <= 1:
            raise UserError(f"--hidden_ratio must be in (0, 1], got {r}")
    mults = _per_stage(mlp_ratio, len(residual), "--mlp_ratio")
    for r in mults or ():
        if not r > 0:
            raise UserError(f"--mlp_ratio must be positive, got {r}")
    follow = follow_dims and dims is not None and ratios is None and mults is None
    for g in groups:
        if g.kind != "hidden" or (ratios is None and mults is None and not follow):
            continue
        s = stage[g.name]
        if follow:
            res = residual[s]
            widths[g.name] = round_width(round(g.width * widths[res.name] / res.width), g.width, round_to)
            continue
        if ratios is not None:
            widths[g.name] = round_width(round(ratios[s] * g.width), g.width, round_to)
            continue
        res = residual[s]
        want = round_width(round(mults[s] * widths.get(res.name, res.width)), 10 ** 12, round_to)
        if want > g.width:
            raise UserError(f"--mlp_ratio {mults[s]:g}: {g.name} has only {g.width} channels, "
                            f"cannot keep {want}")
        widths[g.name] = want
    widths.update(_group_ratio_widths(groups, group_ratio or (), round_to))
    return widths


def _group_ratio_widths(groups, group_ratio, round_to):
    widths = {}
    for pattern, share in group_ratio:
        if not 0 <= share < 1:
            raise UserError(f"--group_ratio {pattern}={share:g}: the share must be in [0, 1)")
        matched = [g for g in groups if fnmatch.fnmatchcase(g.name, pattern)]
        if not matched:
            raise UserError(f"--group_ratio {pattern}={share:g} matches no group "
                            "(--list_groups prints their names)")
        for g in matched:
            keep = math.floor((1 - share) * g.width + 1e-9)
            widths[g.name] = max(round_width(keep, g.width, round_to), min_width(g))
    return widths


def _need_scores(group, scores):
    if scores.get(group.name) is None:
        raise UserError(f"the criterion has nothing to score in {group.name}: it reads per-channel "
                        f"scale factors and this {group.kind} group has none; keep such groups "
                        "whole (--hidden_ratio 1 keeps every MLP; --dims alone scales them) or "
                        "choose another criterion")
    return scores[group.name].score


def plan_keep(groups, scores, dims=None, hidden_ratio=None, round_to=1, targets=None, cost_model=None,
              mlp_ratio=None, group_ratio=None):
    """Kept channel indices per group from the composable keep rules.

    Groups fixed by --dims / --hidden_ratio / --mlp_ratio keep their best channels; if targets
    are given, the remaining groups are ranked together (one global ranking of their scores,
    comparable because every producer is max-normalised) and channels are removed, worst
    first, until every target is met. Groups untouched by any rule keep everything.

    Args:
        groups: channel groups.
        scores: dict group name -> GroupScores or None (from score_groups).
        dims, hidden_ratio, round_to, mlp_ratio, group_ratio: see fixed_widths.
        targets: Targets or None.
        cost_model: CostModel, needed for params / MACs targets.
    Returns:
        dict group name -> sorted int64 tensor of kept indices (every group).
    """
    # MLPs follow --dims unless a target ranks them globally or the criterion cannot score
    # them (slimming: no per-channel scale in an MLP), in which case they stay whole
    targeted = targets is not None and targets.any()
    scorable = all(scores.get(g.name) is not None for g in groups if g.kind == "hidden")
    fixed = fixed_widths(groups, dims, hidden_ratio, round_to, mlp_ratio,
                         follow_dims=scorable and not targeted, group_ratio=group_ratio)
    keep = {}
    for g in groups:
        if fixed.get(g.name, g.width) < g.width:
            keep[g.name] = select(g, ranking(_need_scores(g, scores)), fixed[g.name])
        else:
            keep[g.name] = torch.arange(g.width)
    if targeted:
        free = [g for g in groups if g.name not in fixed]
        if not free:
            raise UserError("--dims and --hidden_ratio / --mlp_ratio already fix every group: "
                            "nothing is left for --target_params / --target_macs / --ratio")
        keep.update(_global_keep(free, scores, keep, round_to, targets, cost_model))
    return keep


def _global_keep(free, scores, keep, round_to, targets, cost_model):
    """Binary search on how many channels to drop from the global worst-first order."""
    orders = [ranking(_need_scores(g, scores)) for g in free]
    entries = []  # (score, -rank, group position): ascending = removed first
    for gi, (g, order) in enumerate(zip(free, orders)):
        s = scores[g.name].score
        entries += [(float(s[i]), -r, gi) for r, i in enumerate(order.tolist())]
    entries.sort()
    group_of = torch.tensor([e[2] for e in entries], dtype=torch.int64)
    total = sum(g.width for g in free)
    if (targets.params is not None or targets.macs is not None) and cost_model is None:
        raise ValueError("params / MACs targets need a cost model")

    def candidate(m):
        removed = torch.bincount(group_of[:m], minlength=len(free)).tolist()
        return {g.name: select(g, order, round_width(g.width - r, g.width, round_to))
                for g, order, r in zip(free, orders, removed)}

    def meets(cand):
        if targets.ratio is not None:
            if sum(v.numel() for v in cand.values()) > (1 - targets.ratio) * total + 1e-9:
                return False
        if targets.params is None and targets.macs is None:
            return True
        params, macs = cost_model({**keep, **cand})
        return ((targets.params is None or params <= targets.params)
                and (targets.macs is None or macs <= targets.macs))

    lo, hi = 0, len(entries)
    if meets(candidate(lo)):
        return candidate(lo)
    smallest = candidate(hi)
    if not meets(smallest):
        raise UserError(_unmet_message(targets, smallest, keep, total, cost_model))
    while hi - lo > 1:  # invariant: candidate(lo) misses a target, candidate(hi) meets all
        mid = (lo + hi) // 2
        if meets(candidate(mid)):
            hi = mid
        else:
            lo = mid
    return candidate(hi)


def _unmet_message(targets, smallest, keep, total, cost_model):
    parts = []
    if targets.params is not None or targets.macs is not None:
        params, macs = cost_model({**keep, **smallest})
        parts.append(f"the smallest reachable shape has {params:,} params and {macs:,} MACs")
    if targets.ratio is not None:
        kept = sum(v.numel() for v in smallest.values())
        parts.append(f"at most {1 - kept / total:.4f} of the ranked channels can go")
    return "target cannot be met: " + "; ".join(parts) + " (every group keeps >= 1 channel)"

"""The keep plan: which channels of every group survive, from the group scores and the rules.

Rules (spec.KeepRules, docs/design.md section 6): dims / hidden_ratio / mlp_ratio /
group_ratio fix some widths; the budgets (pruning/rules.py: target_params / target_macs / ratio
and any registered one) and the latency targets then rank the remaining groups in one global list. Ranking inside a group: higher score first; equal scores keep the lower channel
index (a stable sort), so all-zero scores keep channels 0..k-1. Kept indices are always sorted.
"""
import fnmatch
import math
from dataclasses import dataclass, field

import torch

from common.errors import UserError

from models.groups import part_stop

from .blocks import choose_removed, one_per_stage, removal_order
from .costs import owned_by_any
from .rules import Shape


@dataclass(frozen=True)
class Cut:
    """A plan: kept channel indices per group, and the blocks removed (name -> block score)."""
    keep: dict
    removed: dict = field(default_factory=dict)


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


def _per_stage(values, n_stages, flag):
    if values is None:
        return None
    values = list(values)
    if len(values) == 1:
        return values * n_stages
    if len(values) != n_stages:
        raise UserError(f"{flag} takes 1 or {n_stages} values (one per stage), got {len(values)}")
    return values


def _dims_widths(residual, dims):
    if len(dims) != len(residual):
        raise UserError(f"--dims takes {len(residual)} values for this model "
                        f"(one per stage: {', '.join(g.name for g in residual)}), got {len(dims)}")
    widths = {}
    for g, d in zip(residual, dims):
        if d < 1:
            raise UserError(f"--dims: {g.name} would keep {d} channels; at least 1 is needed")
        if d > g.width:
            raise UserError(f"--dims: {g.name} has only {g.width} channels, cannot keep {d}")
        if d < min_width(g):
            raise UserError(f"--dims: {g.name} needs at least {min_width(g)} channels "
                            "to keep every multi-scale branch")
        widths[g.name] = int(d)
    return widths


def fixed_widths(groups, rules, follow_dims=True):
    """Widths set explicitly: dims for residual groups, hidden_ratio / mlp_ratio for hidden
    ones, group_ratio for any group (it overrides the others).

    With dims alone (and follow_dims), each block's MLP keeps its source ratio to the residual
    width (a 4x MLP stays 4x), so dims alone gives the Efficient ConvNeXt shapes. Per-stage
    values are matched to each group's `stage`.

    Args:
        groups: channel groups (models.channel_groups).
        rules: spec.KeepRules.
        follow_dims: with dims and no hidden rule, scale each MLP with its stage's residual.
    Returns:
        dict group name -> width, for the groups these rules fix.
    """
    streams = [g for g in groups if g.kind == "residual"]
    residual = {g.stage: g for g in streams}
    hidden = [g for g in groups if g.kind == "hidden"]
    if (rules.dims is not None or rules.mlp_ratio is not None) and len(residual) != len(streams):
        raise UserError("--dims / --mlp_ratio need one residual stream per stage, as this toolkit's families "
                        "declare them; this model's groups are traced and have no stages: use --ratio, "
                        "--group_ratio or a global target")
    n_stages = 1 + max(g.stage for g in groups)
    widths = {}
    if (rules.dims is not None or rules.mlp_ratio is not None) and not residual:
        raise UserError("--dims / --mlp_ratio: this model has no residual channel groups (its "
                        "streams stay whole); use --group_ratio, --hidden_ratio or a global target")
    if (rules.hidden_ratio is not None or rules.mlp_ratio is not None) and not hidden:
        raise UserError("--hidden_ratio / --mlp_ratio: this model has no hidden (MLP or inner) "
                        "groups; use --group_ratio or a global target")
    if rules.dims is not None:
        widths.update(_dims_widths([residual[s] for s in sorted(residual)], rules.dims))
    ratios = _per_stage(rules.hidden_ratio, n_stages, "--hidden_ratio")
    mults = _per_stage(rules.mlp_ratio, n_stages, "--mlp_ratio")
    follow = follow_dims and rules.dims is not None and ratios is None and mults is None
    for g in hidden:
        if ratios is not None:
            widths[g.name] = round_width(round(ratios[g.stage] * g.width), g.width, rules.round_to)
            continue
        if not (follow or mults):
            continue
        res = residual[g.stage]
        if follow:
            widths[g.name] = round_width(round(g.width * widths[res.name] / res.width), g.width, rules.round_to)
            continue
        want = round_width(round(mults[g.stage] * widths.get(res.name, res.width)), 10 ** 12, rules.round_to)
        if want > g.width:
            raise UserError(f"--mlp_ratio {mults[g.stage]:g}: {g.name} has only {g.width} channels, "
                            f"cannot keep {want}")
        widths[g.name] = want
    widths.update(_group_ratio_widths(groups, rules.group_ratio or (), rules.round_to))
    return widths


def _group_ratio_widths(groups, group_ratio, round_to):
    widths = {}
    for pattern, share in group_ratio:
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


def plan_keep(groups, scores, rules, *, cost_model=None, latency=None):
    """Kept channel indices per group from the composable keep rules.

    Groups fixed by dims / hidden_ratio / mlp_ratio / group_ratio keep their best channels;
    with a global target, the remaining groups are ranked together (one list of their
    scores: comparable across groups as far as the aggregation's normalisation makes them,
    raw with normalize none) and channels are removed, worst first, until every target is
    met. Groups untouched by any rule keep everything.

    Args:
        groups: channel groups.
        scores: dict group name -> GroupScores or None (from score_groups).
        rules: spec.KeepRules.
        cost_model: costs.CostModel, needed for params / MACs targets.
        latency: (latency.LatencyModel, goal in predicted ms) for a latency target: the same
            worst-first order, until the predicted latency meets the goal too.
    Returns:
        dict group name -> sorted int64 tensor of kept indices (every group).
    """
    # MLPs follow dims unless a target ranks them globally or the criterion cannot score
    # them (slimming: no per-channel scale in an MLP), in which case they stay whole
    scorable = all(scores.get(g.name) is not None for g in groups if g.kind == "hidden")
    fixed = fixed_widths(groups, rules, follow_dims=scorable and not rules.targeted)
    keep = {}
    for g in groups:
        if fixed.get(g.name, g.width) < g.width:
            keep[g.name] = select(g, ranking(_need_scores(g, scores)), fixed[g.name])
        else:
            keep[g.name] = torch.arange(g.width)
    if rules.targeted:
        free = [g for g in groups if g.name not in fixed]
        if not free:
            targets = [f"--{b.name}" for b, _ in rules.given_budgets()] + (["a latency target"] if rules.latency_targeted else [])
            raise UserError("--dims and --hidden_ratio / --mlp_ratio already fix every group: "
                            f"nothing is left for {' / '.join(targets)}")
        keep.update(_global_keep(free, scores, keep, rules, cost_model, latency))
    return keep


def _global_keep(free, scores, keep, rules, cost_model, latency):
    """Binary search on how many channels to drop from the global worst-first order."""
    if rules.latency_targeted and latency is None:
        raise ValueError("a latency target needs a latency model and goal")
    orders = [ranking(_need_scores(g, scores)) for g in free]
    entries = []  # (score, -rank, group position): ascending = removed first
    for gi, (g, order) in enumerate(zip(free, orders)):
        s = scores[g.name].score
        entries += [(float(s[i]), -r, gi) for r, i in enumerate(order.tolist())]
    entries.sort()
    group_of = torch.tensor([e[2] for e in entries], dtype=torch.int64)
    total = sum(g.width for g in free)
    round_to = rules.round_to
    if rules.reads_cost and cost_model is None:
        raise ValueError("params / MACs budgets need a cost model")
    given = rules.given_budgets()

    def candidate(m):
        removed = torch.bincount(group_of[:m], minlength=len(free)).tolist()
        return {g.name: select(g, order, round_width(g.width - r, g.width, round_to))
                for g, order, r in zip(free, orders, removed)}

    def shape(cand):
        return Shape({**keep, **cand}, sum(v.numel() for v in cand.values()), total, cost_model)

    def meets(cand):
        if latency is not None and latency[0].predict({**keep, **cand}) > latency[1]:
            return False
        return all(budget.meets(value, shape(cand)) for budget, value in given)

    lo, hi = 0, len(entries)
    if meets(candidate(lo)):
        return candidate(lo)
    smallest = candidate(hi)
    if not meets(smallest):
        raise UserError(_unmet_message(given, shape(smallest), latency))
    while hi - lo > 1:  # invariant: candidate(lo) misses a target, candidate(hi) meets all
        mid = (lo + hi) // 2
        if meets(candidate(mid)):
            hi = mid
        else:
            lo = mid
    return candidate(hi)


def _unmet_message(given, smallest, latency):
    parts = []
    if latency is not None:
        parts.append(f"the smallest reachable shape is predicted at {latency[0].predict(smallest.keep):.3g} ms "
                     f"(goal {latency[1]:.3g} ms)")
    parts += [budget.reached(smallest) for budget, _ in given]
    return "target cannot be met: " + "; ".join(parts) + " (every group keeps >= 1 channel)"


# --- depth ---------------------------------------------------------------------------------

def remaining_groups(groups, removed):
    """The groups that still exist once the `removed` blocks are gone (a block's own groups,
    every slice inside it, go with it)."""
    def inside(g):
        return all(owned_by_any(p.key, removed) for p in g.slices)
    return [g for g in groups if not (removed and inside(g))]


def _width_plan(groups, scores, rules, removed, cost_model, latency):
    left = remaining_groups(groups, removed)
    cost = cost_model.without(removed) if cost_model is not None else None
    lat = (latency[0].without(removed), latency[1]) if latency is not None else None
    return plan_keep(left, scores, rules, cost_model=cost, latency=lat)


def plan_cut(groups, scores, rules, *, cost_model=None, latency=None, blocks=(), block_scores=None, depths=None):
    """The Cut the rules give: blocks first (--depths / --remove_blocks / --drop_blocks), then the channel
    rules on what is left; with prune_depth, depth and width are planned together
    (`_depth_sweep`).

    Args:
        groups, scores, rules, cost_model, latency: as plan_keep.
        blocks: the removable blocks; block_scores: name -> the criterion's block score;
        depths: blocks per stage of the source.
    """
    if rules.prune_depth:
        return _depth_sweep(groups, scores, rules, cost_model, latency, blocks, block_scores, depths)
    removed = choose_removed(blocks, block_scores, rules, depths) if rules.prunes_depth else {}
    return Cut(_width_plan(groups, scores, rules, removed, cost_model, latency), removed)


def block_costs(blocks, block_scores, groups, scores):
    """Each block's score in the units of the channel ranking: the block scores scaled so that
    their mean equals the mean summed channel score of the groups inside a block (what
    narrowing those groups to nothing would lose)."""
    mass = {}
    for b in blocks:
        inner = [g for g in groups if all(b.owns(p.key) for p in g.slices)]
        mass[b.name] = sum(float(scores[g.name].score.sum()) for g in inner if scores.get(g.name) is not None)
    mean_score = sum(block_scores.values()) / len(blocks)
    mean_mass = sum(mass.values()) / len(blocks)
    if mean_score <= 0 or mean_mass <= 0:
        return {b.name: block_scores[b.name] for b in blocks}
    return {b.name: block_scores[b.name] / mean_score * mean_mass for b in blocks}


def _lost(keep, groups, scores):
    """Summed scores of the channels a plan removes."""
    total = 0.0
    for g in groups:
        s = scores.get(g.name)
        if s is not None and keep[g.name].numel() < g.width:
            gone = torch.ones(g.width, dtype=torch.bool)
            gone[keep[g.name]] = False
            total += float(s.score[gone].sum())
    return total


def _depth_sweep(groups, scores, rules, cost_model, latency, blocks, block_scores, depths):
    """Depth and width together under a latency goal. Blocks are ordered by their cost (block
    score in channel units, `block_costs`) per predicted millisecond their removal saves; for
    k = 0, 1, ... blocks removed in that order (every stage keeps one) the channels are
    narrowed in the criterion's order until the goal is met; the k whose removed blocks and
    channels add up to the lowest score wins. Narrowing stops paying when k blocks alone
    meet the goal: more blocks only add to the loss."""
    model, goal = latency
    costs = block_costs(blocks, block_scores, groups, scores)
    dense_ms = model.predict({})
    saved = {b.name: max(dense_ms - model.without([b.name]).predict({}), 1e-12) for b in blocks}
    sequence = one_per_stage(sorted(removal_order(blocks, block_scores), key=lambda b: costs[b.name] / saved[b.name]),
                             depths)
    best, first_error = None, None
    for k in range(len(sequence) + 1):
        removed = {b.name: block_scores[b.name] for b in sequence[:k]}
        try:
            keep = _width_plan(groups, scores, rules, removed, cost_model, latency)
        except UserError as e:  # the goal is out of reach with k blocks gone
            first_error = first_error or e
            continue
        lost = sum(costs[n] for n in removed) + _lost(keep, remaining_groups(groups, removed), scores)
        if best is None or lost < best[0]:
            best = (lost, Cut(keep, removed))
        if all(keep[g.name].numel() == g.width for g in remaining_groups(groups, removed)):
            break
    if best is None:
        raise first_error
    return best[1]

"""Depth pruning: block scores and which blocks go (docs/design.md section 6c).

A family declares its removable blocks (models/groups.py `Block`: a residual block whose branch
can go, leaving the identity). A criterion scores a whole block through its `block_score`
(pruning/criteria.py), one float, high = keep; the functions here read the block's tensors:
- opnorm: the product of the operator norms of the branch's layers after its last
  normalisation (a bound on how much the branch can add to a unit-scale input): the largest
  singular value of each weight as a [rows, rest] matrix, the largest gain of a norm's affine
  (a BatchNorm's weight / sqrt(running var + eps)) and of the layer scale;
- l1 / l2: the mean norm of the output layer's rows, each times its layer scale (or its
  BatchNorm's gain): what the branch writes into the stream;
- slimming: the mean |scale factor| of the branch's gain (layer scale, last BatchNorm weight);
- taylor: the first-order change of the loss when the branch is scaled to zero,
  |sum of w * dL/dw over the gain tensors|, per calibration batch, averaged;
- skip_logits / skip_output (block-only criteria): on calibration images, the change of the
  logits (squared, relative to the logits' own) or of the block's output (relative to its
  input) when the block is skipped;
- random: seeded uniform.
Importable without torch (the command lines list the criteria before torch loads).
"""
import math
from dataclasses import dataclass, field

from common.errors import UserError

BN_EPS = 1e-5  # torch's BatchNorm default, which every family here uses


@dataclass(frozen=True)
class BlockView:
    """What a block score function reads: the block, the state dict, calibration evidence
    (criteria.EVIDENCE kind -> its measurement, or None) and the seed."""
    block: object
    state: dict = field(repr=False)
    evidence: dict | None = field(default=None, repr=False)
    seed: int = 0


def _gain_vector(state, key):
    """|per-channel gain| of a 1-D scale: a BatchNorm weight over sqrt(var + eps), else |w|."""
    import torch
    w = state[key].detach().double().abs()
    var = state.get(key[:-len("weight")] + "running_var") if key.endswith("weight") else None
    return w / torch.sqrt(var.double() + BN_EPS) if var is not None else w


def _operator_norm(state, key):
    import torch
    t = state[key]
    if t.dim() == 1:
        return float(_gain_vector(state, key).max())
    return float(torch.linalg.matrix_norm(t.detach().double().reshape(t.shape[0], -1), ord=2))


def branch_opnorm(view):
    """Product over the branch's layers of their operator norms (parallel keys: the largest)."""
    return math.prod(max(_operator_norm(view.state, k) for k in layer) for layer in view.block.branch)


def _output_rows(view):
    """The output layer's rows [rows, rest], each times its per-row scale."""
    b = view.block
    w = view.state[b.output].detach().double()
    w = w.reshape(w.shape[0], -1)
    return w * _gain_vector(view.state, b.scale)[:, None] if b.scale else w


def output_l1(view):
    return float(_output_rows(view).abs().sum(1).mean())


def output_l2(view):
    return float(_output_rows(view).norm(dim=1).mean())


def gain_slimming(view):
    """Mean |scale factor| of the tensor that scales the branch (layer scale / BatchNorm weight)."""
    key = view.block.gain[0]
    if view.state[key].dim() != 1:
        raise UserError(f"criterion slimming: block {view.block.name} has no per-channel scale factor "
                        "(no layer scale); choose another criterion")
    return float(view.state[key].detach().double().abs().mean())


def taylor_branch(view):
    """Mean over calibration batches of |sum over the gain tensors of w * dL/dw|."""
    sums = view.evidence["saliency_sums"]
    per_batch = [sum(sums[k][i] for k in view.block.gain) for i in range(len(sums[view.block.gain[0]]))]
    return sum(abs(v) for v in per_batch) / len(per_batch)


def skip_logits(view):
    return view.evidence["skip"]["logits"][view.block.name]


def skip_output(view):
    return view.evidence["skip"]["output"][view.block.name]


def random_block(view):
    import torch
    from .scoring import seed_for
    gen = torch.Generator().manual_seed(seed_for(view.seed, "block:" + view.block.name))
    return float(torch.rand((), generator=gen, dtype=torch.float64))


def score_blocks(state, blocks, crit, *, seed=0, evidence=None):
    """name -> the criterion's score of each block (finite; UserError where it has no block score)."""
    check_block_score(crit)
    scores = {}
    for b in blocks:
        try:
            value = float(crit.block_score(BlockView(b, state, evidence, seed)))
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001  (a registered criterion is user code: any failure is one line)
            raise UserError(f"criterion {crit.name} failed on block {b.name}: {type(e).__name__}: {e}") from None
        if not math.isfinite(value):
            raise UserError(f"criterion {crit.name} gave block {b.name} a score of {value}: its weights "
                            "or calibration evidence hold NaN or infinite values")
        scores[b.name] = value
    return scores


def check_block_score(crit):
    """Refuse a criterion without a block score for a depth rule, naming those that have one."""
    if crit.block_score is None:
        from .criteria import CRITERIA
        names = ", ".join(c.name for c in CRITERIA.values() if c.block_score is not None)
        raise UserError(f"criterion {crit.name} does not score whole blocks; depth rules (--depths, --remove_blocks, "
                        f"--drop_blocks, --prune_depth) take one of: {names}")


def check_depth_rules(rules, blocks, n_stages):
    """Refuse depth rules this model cannot take (before anything is scored)."""
    if not rules.prunes_depth:
        return
    if not blocks:
        raise UserError("depth rules (--depths, --remove_blocks, --drop_blocks, --prune_depth): this model declares no "
                        "removable blocks (residual blocks with an identity shortcut)")
    if rules.depths is not None and len(rules.depths) != n_stages:
        raise UserError(f"--depths takes {n_stages} values for this model (blocks kept per stage), "
                        f"got {len(rules.depths)}")


def one_per_stage(blocks, depths):
    """The blocks, in the order given, that can go while every stage keeps one block."""
    left, out = list(depths), []
    for b in blocks:
        if left[b.stage] > 1:
            left[b.stage] -= 1
            out.append(b)
    return out


def removal_order(blocks, scores):
    """Blocks lowest score first (equal scores: the later block first, as it is nearer the
    head and its removal disturbs fewer layers)."""
    return sorted(blocks, key=lambda b: (scores[b.name], -b.stage, -b.index))


def _named(blocks, scores, names, left):
    by_name = {b.name: b for b in blocks}
    removed = {}
    for name in names:
        if name not in by_name:
            raise UserError(f"--drop_blocks {name}: not a removable block of this model (prune.py --list_groups "
                            "lists them)")
        b = by_name[name]
        if name in removed:
            continue
        if left[b.stage] == 1:
            raise UserError(f"--drop_blocks: stage {b.stage} would keep no block; every stage keeps one")
        left[b.stage] -= 1
        removed[name] = scores[name]
    return removed


def choose_removed(blocks, scores, rules, depths):
    """The blocks --depths / --remove_blocks / --drop_blocks remove: name -> score, lowest
    first (--drop_blocks: as named).

    Args:
        blocks: the removable blocks; scores: name -> score.
        rules: spec.KeepRules.
        depths: blocks per stage of the source (every block, removable or not).
    """
    if rules.drop_blocks is not None:
        return _named(blocks, scores, rules.drop_blocks, list(depths))
    order = removal_order(blocks, scores)
    if rules.depths is not None:
        removed = {}
        for s, (want, have) in enumerate(zip(rules.depths, depths)):
            if want > have:
                raise UserError(f"--depths: stage {s} has {have} blocks, cannot keep {want}")
            # want >= 1 (KeepRules) and at most a stage's first block is not removable: enough can go
            stage = [b for b in order if b.stage == s]
            removed.update((b.name, scores[b.name]) for b in stage[:have - want])
        return {b.name: removed[b.name] for b in order if b.name in removed}  # lowest first
    removed = {b.name: scores[b.name] for b in one_per_stage(order, depths)[:rules.remove_blocks]}
    if len(removed) < rules.remove_blocks:
        raise UserError(f"--remove_blocks {rules.remove_blocks}: only {len(removed)} blocks can go "
                        "(every stage keeps one, and blocks with a downsampling shortcut stay)")
    return removed

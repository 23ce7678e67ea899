"""What a cut does to the statistics every norm of the pruned model computes (the evidence
behind --compensate; the command line is pruning/diagnose.py).

For each LayerNorm / BatchNorm, on calibration images through the dense model and a pruned
copy (its kept channels from the checkpoint's `pruning.kept` record):
- energy: the share of the dense input's sum of squares that the kept channels carry;
- peak: the largest channel RMS over the median one (how much a few channels stand out),
  and how many of the `top` largest-RMS channels were kept;
- sel_shift / sel_var (LayerNorm): the selection alone, on the dense input: the per-token mean
  of the kept channels minus the mean of all (in units of the full standard deviation), and
  the geometric mean over tokens of var(kept) / var(all): what the norm would divide by if
  nothing upstream had changed;
- shift / var: the same for what the pruned model's norm actually computes from its own
  input (BatchNorm: its per-channel batch statistics against the dense ones, kept channels);
- cos_in / cos_out: cosine similarity per image between the dense tensor restricted to the
  kept channels and the pruned one, at the norm's input and output.
"""
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

import models
from checkpoints.identity import read_held
from common.errors import UserError

from .probe import capture_all, channel_axis, channels_last, kept_channels, norm_order, stage_of


@dataclass
class NormRow:
    """One norm's numbers (see the module doc); sel_* are None for a BatchNorm."""
    name: str
    kind: str
    stage: int | None
    kept: int
    width: int
    energy: float
    peak: float
    top_kept: int
    top: int
    sel_shift: float | None
    sel_var: float | None
    shift: float
    var: float
    cos_in: float
    cos_out: float


class _Sums:
    """Running sums of one norm over the calibration batches."""

    def __init__(self, width):
        self.sq = torch.zeros(width, dtype=torch.float64)  # dense input, per channel
        self.tokens = 0
        self.sel = torch.zeros(2, dtype=torch.float64)  # |mean shift|, log var ratio (LayerNorm)
        self.act = torch.zeros(2, dtype=torch.float64)
        self.bn = None  # BatchNorm: per kept channel sums of p, p^2, d, d^2
        self.cos = torch.zeros(2, dtype=torch.float64)
        self.images = 0


def _token_stats(t):
    return t.mean(1), t.var(1, unbiased=False)


def _shift_var(sub, full):
    """Per token |mean(sub) - mean(full)| / std(full) and log(var(sub) / var(full)), summed."""
    (ms, vs), (mf, vf) = _token_stats(sub), _token_stats(full)
    eps = 1e-12
    return torch.stack([((ms - mf).abs() / (vf + eps).sqrt()).sum(), torch.log((vs + eps) / (vf + eps)).sum()])


def _cosine(a, b):
    a, b = a.flatten(1).double(), b.flatten(1).double()
    return nn.functional.cosine_similarity(a, b, dim=1, eps=1e-12).sum()


def _accumulate(s, d_norm, p_norm, kept, xd, xp):
    axis = channel_axis(d_norm)
    d, p = channels_last(d_norm, xd), channels_last(p_norm, xp)
    dk = d[:, kept]
    s.sq += (d * d).sum(0)
    s.tokens += d.shape[0]
    if isinstance(d_norm, nn.LayerNorm):
        s.sel += _shift_var(dk, d)
        s.act += _shift_var(p, d)
    else:
        sums = torch.stack([p.sum(0), (p * p).sum(0), dk.sum(0), (dk * dk).sum(0)])
        s.bn = sums if s.bn is None else s.bn + sums
    with torch.no_grad():
        s.cos += torch.stack([_cosine(xd.index_select(axis, kept), xp),
                              _cosine(d_norm(xd).index_select(axis, kept), p_norm(xp))])
    s.images += xd.shape[0]


def _row(name, norm, stage, kept, s, top):
    width = s.sq.numel()
    rms = (s.sq / s.tokens).sqrt()
    order = torch.argsort(rms, descending=True)[:top]
    is_kept = torch.zeros(width, dtype=torch.bool)
    is_kept[kept] = True
    median = float(rms.median())
    if isinstance(norm, nn.LayerNorm):
        sel_shift, sel_var = float(s.sel[0] / s.tokens), math.exp(float(s.sel[1] / s.tokens))
        shift, var = float(s.act[0] / s.tokens), math.exp(float(s.act[1] / s.tokens))
    else:
        mp, mp2, md, md2 = (v / s.tokens for v in s.bn)
        vp, vd = (mp2 - mp ** 2).clamp_min(0), (md2 - md ** 2).clamp_min(0)
        sel_shift = sel_var = None
        shift = float(((mp - md).abs() / (vd + 1e-12).sqrt()).mean())
        var = math.exp(float(torch.log((vp + 1e-12) / (vd + 1e-12)).mean()))
    return NormRow(name, "LayerNorm" if isinstance(norm, nn.LayerNorm) else "BatchNorm", stage,
                   kept.numel(), width, float(s.sq[kept].sum() / s.sq.sum().clamp_min(1e-30)),
                   float(rms.max()) / median if median > 0 else math.inf, int(is_kept[order].sum()), len(order),
                   sel_shift, sel_var, shift, var, float(s.cos[0] / s.images), float(s.cos[1] / s.images))


def diagnose(dense, pruned, groups, keep, images, top=5):
    """NormRows of every norm of `dense` (in forward order) against `pruned`.

    Args:
        dense, pruned: the two models (eval mode).
        groups: channel groups of the dense shape; keep: group name -> kept indices.
        images: list of image batches.
        top: how many of the largest-RMS channels to check.
    """
    names = norm_order(dense, images[0])
    sums = {n: _Sums(_width(dense.get_submodule(n))) for n in names}
    kept = {n: _kept(groups, keep, n, sums[n].sq.numel()) for n in names}
    for x in images:
        xd, xp = capture_all(dense, names, x), capture_all(pruned, names, x)
        for n in names:
            _accumulate(sums[n], dense.get_submodule(n), pruned.get_submodule(n), kept[n], xd[n], xp[n])
    return [_row(n, dense.get_submodule(n), stage_of(groups, f"{n}.weight"), kept[n], sums[n], top) for n in names]


def _width(norm):
    return norm.normalized_shape[0] if isinstance(norm, nn.LayerNorm) else norm.num_features


def _kept(groups, keep, name, width):
    kept = kept_channels(groups, keep, f"{name}.weight")
    return torch.arange(width) if kept is None else kept


def stage_outputs(rows):
    """Per stage, the last norm in forward order (its input is the stage's output in the
    ConvNeXt families: the next downsampling norm, or the final norm)."""
    last = {}
    for r in rows:
        if r.stage is not None:
            last[r.stage] = r
    return [last[s] for s in sorted(last)]


def as_dicts(rows):
    return [asdict(r) for r in rows]



def pruned_keep(ckpt, source, label):
    """The kept indices a pruned checkpoint records (`pruning.kept`), checked against the source."""
    record = ckpt.get("pruning") if isinstance(ckpt, dict) else None
    if not isinstance(record, dict) or not isinstance(record.get("kept"), dict):
        raise UserError(f"{label} records no kept channels (`pruning.kept`): give a checkpoint "
                        "written by pruning/prune.py or pruning.prune")
    sha = record.get("source_sha256")
    if sha and source.sha256 and sha != source.sha256:
        raise UserError(f"{label} was pruned from another checkpoint (source sha256 {sha[:12]}..., "
                        f"not {source.sha256[:12]}...)")
    widths = {g.name: g.width for g in source.groups}
    if set(record["kept"]) != set(widths) or any(max(v) >= widths[k] for k, v in record["kept"].items() if v):
        raise UserError(f"{label} was pruned from a model of another shape than {source.label}")
    return {k: torch.as_tensor(v, dtype=torch.int64) for k, v in record["kept"].items()}


def diagnose_checkpoints(source, pruned, batches, top=5):
    """{label: NormRows} for each pruned checkpoint against the source.

    Args:
        source: an api.Source (the dense model).
        pruned: {label: loaded pruned checkpoint dict}.
        batches: calibration (images, labels) batches.
    """
    dense = models.with_weights(source.arch, source.sds[source.scored])
    images = [x for x, _ in batches]
    out = {}
    for label, ckpt in pruned.items():
        keep = pruned_keep(ckpt, source, label)
        held = read_held(ckpt)
        out[label] = diagnose(dense, models.with_weights(held.arch, held.state), source.groups, keep, images, top)
    return out

"""Fitting the pruned model to the dense one after the cut (`--compensate`, any criterion;
docs/design.md section 7b).

A cut changes what every later layer sees. On calibration images, in forward order (each fit
sees the ones before it done), with the dense model as the target:
- stats: a LayerNorm has no state to re-measure, so its affine is refit: each kept channel's
  normalised value p is mapped onto the dense model's d by least squares, d ~ a p + c
  (w' = w a, b' = b + w c). BatchNorm running statistics are measured again.
- refit: stats, and each Linear that reads a LayerNorm (MLP input, head) is fit by ridge least
  squares to the dense outputs; a conv reading one (downsampling) gets the cut channels' mean
  output in its bias. pruning/diagnose.py showed why the readers matter: the statistics the
  norms compute barely move at the 13M shape, while the layer after the cut loses the
  contributions it was trained to read.
Only affines, weights, biases and running statistics change: the shape, folding and export
are those of the uncompensated model.
"""
import torch
import torch.nn as nn

import models

from .probe import FixedInputs, capture, channels_last, consumers, kept_channels, norm_order


def compensate(dense_arch, dense_sd, pruned_arch, pruned_sd, groups, keep, batches, method="refit", renamed=None):
    """The pruned weights, compensated.

    Args:
        dense_arch, dense_sd: the source model.
        pruned_arch, pruned_sd: the pruned one (not modified).
        groups: channel groups of the source shape; keep: group name -> kept indices.
        batches: calibration (images, labels) batches.
        method: "stats" (the norms only) or "refit" (the norms and the layers reading them).
        renamed: a source module's name in the pruned model, None where its block was removed
            (depth pruning); default: the same name.
    Returns:
        (new pruned state dict, {"layernorms": refit, "batchnorms": re-measured}).
    """
    if method not in ("stats", "refit"):
        raise ValueError(f"compensate: method must be stats or refit, not {method!r}")
    dense, pruned = models.with_weights(dense_arch, dense_sd), models.with_weights(pruned_arch, pruned_sd)
    images = [x for x, _ in batches]
    order = norm_order(dense, images[0])
    layer_norms = [n for n in order if isinstance(dense.get_submodule(n), nn.LayerNorm)]
    readers = consumers(dense, images[0], layer_norms)
    renamed = renamed or (lambda module: module)
    layer_norms = [n for n in layer_norms if renamed(n) is not None]
    dense_in, refit = FixedInputs(dense, layer_norms, images), 0
    for name in layer_norms:
        kept = kept_channels(groups, keep, f"{name}.weight")
        if kept is None:
            kept = torch.arange(dense.get_submodule(name).normalized_shape[0])
        reader = readers.get(name) if method == "refit" else None
        refit += _refit_layer_norm(dense, pruned, name, kept, reader, groups, keep, dense_in, renamed)
    batch_norms = [n for n in order if not isinstance(dense.get_submodule(n), nn.LayerNorm)]
    if batch_norms:
        _remeasure_batch_norms(pruned, images)
    state = {k: v.detach().clone() for k, v in pruned.state_dict().items()}
    return state, {"layernorms": refit, "batchnorms": len(batch_norms)}


def _normalised(module, x):
    """(tokens, channels) of a LayerNorm's input, normalised without its affine (float64)."""
    t = channels_last(module, x)
    return (t - t.mean(1, keepdim=True)) / torch.sqrt(t.var(1, unbiased=False, keepdim=True) + module.eps)


RIDGE = 1e-2  # a reader's refit is pulled toward its weights by this share of the mean input energy


def _refit_layer_norm(dense, pruned, name, kept, reader, groups, keep, dense_in, renamed):
    """Fit one LayerNorm of `pruned` (and the layer that reads it, if given) to the dense
    model; 0 when the norm sees the dense input already (nothing upstream was cut), else 1."""
    d_norm, p_norm = dense.get_submodule(name), pruned.get_submodule(renamed(name))
    width = d_norm.normalized_shape[0]
    cut = torch.ones(width, dtype=torch.bool)
    cut[kept] = False
    d_reader = dense.get_submodule(reader) if reader else None
    linear = isinstance(d_reader, nn.Linear)
    rows = kept_channels(groups, keep, f"{reader}.weight", axis=0) if reader else None
    if linear:  # the reader's dense output from the dense norm's output, kept rows only
        d_affine = d_norm.weight.detach().double(), d_norm.bias.detach().double()
        r_weight, r_bias = d_reader.weight.detach().double(), d_reader.bias.detach().double()
        if rows is not None:
            r_weight, r_bias = r_weight[rows], r_bias[rows]
    sums = torch.zeros(4, kept.numel(), dtype=torch.float64)  # of p, d, p^2, p d per kept channel
    cut_sum, n, ptp, ptz = torch.zeros(int(cut.sum()), dtype=torch.float64), 0, 0, 0
    for i, x in enumerate(dense_in.images):
        xd, xp = dense_in.get(name, i), capture(pruned, renamed(name), x)
        if i == 0 and kept.numel() == width and torch.equal(xp, xd):
            return 0
        d, p = _normalised(d_norm, xd), _normalised(p_norm, xp)
        dk = d[:, kept]
        sums += torch.stack([p.sum(0), dk.sum(0), (p * p).sum(0), (p * dk).sum(0)])
        cut_sum += d[:, cut].sum(0)
        n += d.shape[0]
        if linear:
            z = nn.functional.linear(d * d_affine[0] + d_affine[1], r_weight, r_bias)
            aug = torch.cat([p, torch.ones(p.shape[0], 1, dtype=p.dtype)], 1)
            ptp, ptz = ptp + aug.T @ aug, ptz + aug.T @ z
    _fit_affine(p_norm, sums / n)
    if linear:
        _refit_reader(pruned.get_submodule(renamed(reader)), p_norm, ptp, ptz)
    elif reader is not None and bool(cut.any()):
        _absorb_cut_mean(dense, pruned.get_submodule(renamed(reader)), d_norm, reader, cut, cut_sum / n, rows)
    return 1


def _fit_affine(norm, means):
    """Per channel least squares d ~ a p + c (means: of p, d, p^2, p d); w' = w a, b' = b + w c."""
    mp, md, mpp, mpd = means
    var_p = mpp - mp ** 2
    flat = var_p <= 1e-12  # a constant channel: keep its scale, match its mean
    slope = torch.where(flat, torch.ones_like(mp), (mpd - mp * md) / var_p.clamp_min(1e-12))
    offset = md - slope * mp
    with torch.no_grad():
        w, b = norm.weight.double(), norm.bias.double()
        norm.bias.copy_((b + w * offset).to(norm.bias.dtype))
        norm.weight.copy_((w * slope).to(norm.weight.dtype))


def _refit_reader(reader, norm, ptp, ptz):
    """Ridge least squares of a Linear reader (weights and bias) onto the dense reader's
    outputs, from the refit norm's outputs; ptp / ptz: sums of [p 1]^T [p 1] and [p 1]^T z
    over tokens of the unnormalised-affine p (the norm's affine is applied here)."""
    k = norm.weight.numel()
    m = torch.eye(k + 1, dtype=torch.float64)  # [p 1] m = [norm output, 1]
    m[range(k), range(k)] = norm.weight.detach().double()
    m[k, :k] = norm.bias.detach().double()
    g, h = m.T @ ptp @ m, m.T @ ptz
    theta0 = torch.cat([reader.weight.detach().double().T, reader.bias.detach().double()[None]], 0)
    lam = RIDGE * float(torch.diagonal(g)[:k].mean())
    theta = torch.linalg.solve(g + lam * torch.eye(k + 1, dtype=g.dtype), h + lam * theta0)
    with torch.no_grad():
        reader.weight.copy_(theta[:k].T.to(reader.weight.dtype))
        reader.bias.copy_(theta[k].to(reader.bias.dtype))


def _absorb_cut_mean(dense, p_reader, d_norm, reader, cut, cut_mean, rows):
    """A conv reader: the dense mean output of the cut channels, through its weights, into
    its bias (rows: its kept output channels, None for all)."""
    if p_reader.bias is None:
        return
    mean_out = d_norm.weight.double()[cut] * cut_mean + d_norm.bias.double()[cut]
    weight = dense.get_submodule(reader).weight.double()[:, cut]
    if weight.dim() == 4:  # a conv without padding sees the mean at every tap
        weight = weight.sum((2, 3))
    delta = weight @ mean_out
    if rows is not None:
        delta = delta[rows]
    with torch.no_grad():
        p_reader.bias.add_(delta.to(p_reader.bias.dtype))


def _remeasure_batch_norms(model, images):
    """Every BatchNorm's running mean / variance as the cumulative average over the images."""
    bns = [m for m in model.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    try:
        with torch.no_grad():
            for x in images:
                model(x)
    finally:
        for m, momentum in zip(bns, saved):
            m.momentum = momentum
            m.eval()

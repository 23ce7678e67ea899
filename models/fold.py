"""Inference-form folding: a normalisation's affine merged into the layer next to it.

Each family's `fold()` says which pairs it has; these helpers do the algebra, in place, under
no_grad. The folded model computes the same function up to rounding, but it has other keys
(a conv gains a bias, a BatchNorm becomes Identity): it is for export and evaluation, never
for a checkpoint.
"""
import torch
import torch.nn as nn


@torch.no_grad()
def norm_into_linear(norm, linear):
    """LayerNorm (affine w, b) followed by a Linear (W, c): W' = W diag(w), c' = c + W b.
    Returns the LayerNorm without affine that replaces `norm`."""
    w, b = norm.weight, norm.bias
    bias = linear.bias + linear.weight @ b
    linear.weight.mul_(w[None, :])
    linear.bias.copy_(bias)
    return type(norm)(norm.normalized_shape, eps=norm.eps, elementwise_affine=False)


@torch.no_grad()
def norm_into_conv(norm, conv):
    """Channel LayerNorm (w, b) followed by a dense conv: scale the input channels by w and
    add the conv of the constant b to the bias (exact for a conv without padding)."""
    if conv.groups != 1 or any(p != 0 for p in conv.padding):
        raise ValueError("only a dense conv without padding takes a folded LayerNorm")
    w, b = norm.weight, norm.bias
    extra = (conv.weight * b[None, :, None, None]).sum(dim=(1, 2, 3))
    conv.weight.mul_(w[None, :, None, None])
    conv.bias.add_(extra)
    return type(norm)(norm.normalized_shape, eps=norm.eps, elementwise_affine=False)


@torch.no_grad()
def bn_into_conv(conv, bn):
    """A conv followed by an eval-mode BatchNorm, as one conv with a bias."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                      conv.padding, conv.dilation, conv.groups, bias=True,
                      device=conv.weight.device, dtype=conv.weight.dtype)
    fused.weight.copy_(conv.weight * scale[:, None, None, None])
    base = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    fused.bias.copy_(bn.bias + (base - bn.running_mean) * scale)
    return fused


@torch.no_grad()
def bn_into_linear(linear, bn):
    """A Linear followed by an eval-mode BatchNorm1d, as one Linear."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    fused = nn.Linear(linear.in_features, linear.out_features, device=linear.weight.device,
                      dtype=linear.weight.dtype)
    fused.weight.copy_(linear.weight * scale[:, None])
    fused.bias.copy_(bn.bias + (linear.bias - bn.running_mean) * scale)
    return fused

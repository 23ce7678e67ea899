"""Building blocks shared by the ConvNeXt families (official key layout)."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .protocol import TimmProtocol

# Multi-scale depthwise branches: name -> (kernel size, dilation). Order is channel order.
MS_BRANCHES = {"local": (3, 1), "mid": (7, 1), "wide": (7, 3)}


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an (N, C, H, W) tensor, using the library kernel."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)  # (N, C, H, W) -> (N, H, W, C)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)


def default_branch_widths(dim):
    """The 1:2:1 split of `dim` channels over the 3x3, 7x7 and dilated 7x7 branches."""
    side = dim // 4
    return [side, dim - 2 * side, side]


class MultiScaleDWConv(nn.Module):
    """Parallel depthwise convs over a channel split, outputs concatenated.

    Args:
        widths (list[int]): channels of the 3x3, 7x7 and 7x7-dilation-3 branches
            (about a 19x19 field); a zero-width branch is left out.
    """

    def __init__(self, widths):
        super().__init__()
        self.widths = [int(w) for w in widths]
        for (name, (k, d)), w in zip(MS_BRANCHES.items(), self.widths):
            if w > 0:
                setattr(self, name, nn.Conv2d(w, w, k, padding=d * (k - 1) // 2, dilation=d, groups=w))

    def forward(self, x):
        # channel slices by Python ints, so torch.fx can trace it (timm's feature extractors)
        outs, start = [], 0
        for name, w in zip(MS_BRANCHES, self.widths):
            if w > 0:
                outs.append(getattr(self, name)(x[:, start:start + w]))
                start += w
        return torch.cat(outs, dim=1)


class ScaledLinear(nn.Linear):
    """A Linear whose outputs can be scaled per feature (layer scale) in the same call.

    `scale * (x W^T + b)` is computed as `x (scale W)^T + scale b`: one pass less over the
    activations than a separate multiply, with the weights and keys of a plain Linear.
    """

    def forward(self, x, scale=None):
        if scale is None:
            return super().forward(x)
        return F.linear(x, self.weight * scale[:, None], self.bias * scale)


class Block(nn.Module):
    """ConvNeXt block: dwconv -> LayerNorm -> Linear -> GELU -> Linear -> layer scale -> drop path.

    Args:
        dim (int): residual channels.
        hidden (int): MLP hidden channels (4 * dim unpruned).
        drop_path (float): stochastic depth rate.
        layer_scale_init_value (float): initial gamma; <= 0 disables layer scale.
        dw_branches (list[int] | None): multi-scale depthwise widths, None for one 7x7 conv.
    """

    def __init__(self, dim, hidden=None, drop_path=0., layer_scale_init_value=1e-6, dw_branches=None):
        super().__init__()
        hidden = 4 * dim if hidden is None else hidden
        if dw_branches is None:
            self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        else:
            self.dwconv = MultiScaleDWConv(dw_branches)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, hidden)  # pointwise conv as Linear on (N, H, W, C)
        self.act = nn.GELU()
        self.pwconv2 = ScaledLinear(hidden, dim)
        self.gamma = (nn.Parameter(layer_scale_init_value * torch.ones(dim))
                      if layer_scale_init_value > 0 else None)
        self.drop_path = nn.Identity()
        if drop_path > 0.:  # timm only when training with drop path: eval and pruning start without it
            from timm.layers import DropPath
            self.drop_path = DropPath(drop_path)

    def forward(self, x):
        shortcut = x
        x = self.dwconv(x)
        x = x.permute(0, 2, 3, 1)  # (N, C, H, W) -> (N, H, W, C)
        x = self.pwconv2(self.act(self.pwconv1(self.norm(x))), scale=self.gamma)
        x = x.permute(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)
        return shortcut + self.drop_path(x)


class PooledHead(TimmProtocol, nn.Module):
    """The shared tail of the ConvNeXt families: global pool, LayerNorm, Linear head.

    Subclasses build `self.norm` and `self.head`, call `init_weights`, then `_init_protocol`
    (models/protocol.py: forward_features gives the unpooled map, forward_head pools it).
    """

    def _pre_logits(self, x):
        return self.norm(x)

    def init_weights(self, head_init_scale):
        """Official init, the head's weights and bias then scaled by `head_init_scale`."""
        self.apply(init_weights)
        with torch.no_grad():
            self.head.weight.mul_(head_init_scale)
            self.head.bias.mul_(head_init_scale)



def init_weights(module):
    """Official init: truncated normal (std .02) weights, zero biases for convs and linears."""
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.trunc_normal_(module.weight, std=.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def block_hidden_widths(hidden, depths, dims):
    """Per-block MLP widths: the given nested list, or 4 * dim everywhere."""
    if hidden is None:
        return [[4 * d] * n for n, d in zip(depths, dims)]
    return [list(map(int, h)) for h in hidden]


def layer_scale_value(present, kwargs):
    """Initial layer scale for a rebuild: the shape (gamma or not) comes from the arch."""
    value = kwargs.get("layer_scale_init_value", 1e-6)
    return (value if value > 0 else 1e-6) if present else 0.


def drop_path_rates(rate, n):
    """Stochastic depth rising linearly from 0 to `rate` over `n` blocks (plain floats)."""
    return [rate * i / (n - 1) if n > 1 else 0. for i in range(n)]


def spans(lists):
    """Per-stage width lists as text: "384,768" or "128-384,768" where a stage's widths vary."""
    return ",".join(str(min(h)) if min(h) == max(h) else f"{min(h)}-{max(h)}" for h in lists)

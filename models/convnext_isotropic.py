"""Isotropic ConvNeXt (no downsampling stages), official key layout: stem, blocks, norm, head."""
import torch.nn as nn

from .family import Family, match_layer_ids
from .fold import norm_into_linear
from .groups import Group, Part, Producer, block_residual_parts, convnext_block, hidden_group, linear_parts, norm_parts
from .layers import Block, PooledHead, drop_path_rates, layer_scale_value, spans
from .registry import register_factory, register_family


class ConvNeXtIsotropic(PooledHead, Family):
    first_conv = "stem"
    group_patterns = {"fine": dict(stem=r"^stem", blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))]),
                      "coarse": dict(stem=r"^stem", blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])}

    """A 16x16/16 patchify stem followed by `depth` blocks of one width.

    Args:
        in_chans (int): input image channels.
        num_classes (int): classifier outputs.
        depth (int): number of blocks.
        dim (int): residual width.
        hidden (list[int] | None): MLP width of every block; None is 4 * dim.
        drop_path_rate (float): stochastic depth rate, rising linearly over the blocks.
        layer_scale_init_value (float): initial layer scale; the official default 0 disables it.
        head_init_scale (float): multiplier on the initial head weights and bias.
        global_pool (str): "avg" (official), "max", "avgmax", or "" (the head at every position).
        drop_rate (float): dropout before the classifier (timm's argument; 0 as official).
    """

    def __init__(self, in_chans=3, num_classes=1000, depth=18, dim=384, hidden=None,
                 drop_path_rate=0., layer_scale_init_value=0., head_init_scale=1., global_pool="avg", drop_rate=0.):
        super().__init__()
        hidden = [4 * dim] * depth if hidden is None else list(map(int, hidden))
        self.stem = nn.Conv2d(in_chans, dim, kernel_size=16, stride=16)
        rates = drop_path_rates(drop_path_rate, depth)
        self.blocks = nn.Sequential(*[Block(dim, hidden[j], rates[j], layer_scale_init_value)
                                      for j in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        self.init_weights(head_init_scale)
        self.arch = {"family": "convnext_isotropic", "depth": depth, "dim": dim, "hidden": hidden,
                     "layer_scale": layer_scale_init_value > 0,
                     "num_classes": num_classes, "in_chans": in_chans}
        self._init_protocol(global_pool, drop_rate)

    def _levels(self):
        """Every block (the stem before the first), as timm taps its isotropic models."""
        return [(f"blocks.{j}", [f"blocks.{j}"],
                 (lambda x, j=j: self.blocks[j](self.stem(x) if j == 0 else x))) for j in range(len(self.blocks))]

    def _level_info(self):
        return [(self.arch["dim"], 16)] * len(self.blocks)

    def fold(self):
        """Inference form: block norm -> pwconv1, final norm -> head (models/fold.py)."""
        for block in self.blocks:
            block.norm = norm_into_linear(block.norm, block.pwconv1)
        self.norm = norm_into_linear(self.norm, self.head)
        return self

    @classmethod
    def from_arch(cls, arch, **kwargs):
        kwargs["layer_scale_init_value"] = layer_scale_value(arch.get("layer_scale", False), kwargs)
        keys = ("depth", "dim", "hidden", "num_classes", "in_chans")
        return cls(**{k: arch[k] for k in keys if k in arch}, **kwargs)

    @staticmethod
    def describe(arch):
        pruned = arch.get("hidden") and any(h != 4 * arch["dim"] for h in arch["hidden"])
        return (f"isotropic ConvNeXt depth {arch['depth']} dim {arch['dim']}"
                + (" with pruned MLP widths" if pruned else ""))

    @staticmethod
    def widths(arch):
        return [("blocks", str(arch["depth"])), ("dim", str(arch["dim"])), ("MLP width", spans([arch["hidden"]]))]

    @staticmethod
    def infer_arch(sd):
        """The arch of an official isotropic state dict, or None when it is not one."""
        if "stem.weight" not in sd or "blocks.0.pwconv1.weight" not in sd:
            return None
        depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
        return {"family": "convnext_isotropic", "depth": depth, "dim": sd["stem.weight"].shape[0],
                "hidden": [sd[f"blocks.{j}.pwconv1.weight"].shape[0] for j in range(depth)],
                "layer_scale": "blocks.0.gamma" in sd,
                "num_classes": sd["head.weight"].shape[0], "in_chans": sd["stem.weight"].shape[1]}

    @staticmethod
    def channel_groups(arch):
        """One residual group for the whole network, a hidden group per block."""
        producers, slices, scales, groups = [Producer((Part("stem.weight", 0),))], [], [], []
        slices += linear_parts("stem", False)
        for j in range(arch["depth"]):
            block = f"blocks.{j}"
            dw = (Part(f"{block}.dwconv.weight", 0), Part(f"{block}.dwconv.bias", 0))
            p, sl, sc = block_residual_parts(block, arch.get("layer_scale", False), dw)
            producers, slices, scales = producers + list(p), slices + list(sl), scales + list(sc)
            groups.append(hidden_group(f"{block}.hidden", block, arch["hidden"][j], 0))
        slices += norm_parts("norm") + linear_parts("head", True)
        scales.append("norm.weight")
        groups.append(Group("blocks.residual", "residual", arch["dim"], tuple(producers),
                            tuple(slices), tuple(scales), stage=0))
        return groups

    @staticmethod
    def removable_blocks(arch):
        return [convnext_block("blocks", j, 0, arch.get("layer_scale", False)) for j in range(arch["depth"])]

    @staticmethod
    def example_arch():
        return {"family": "convnext_isotropic", "depth": 2, "dim": 8, "hidden": [32, 16],
                "layer_scale": True, "num_classes": 3, "in_chans": 3}

    @staticmethod
    def layer_ids(param_names):
        """One id per block (the official isotropic rule): stem 0, block j is j + 1."""
        return match_layer_ids(param_names, [(r"^stem[._]", "stem"), (r"^blocks\.(\d+)\.", "block")],
                               _isotropic_ids)


def _isotropic_ids(positions):
    blocks = [p[1][0] for p in positions.values() if p and p[0] == "block"]
    if not blocks:
        return None
    num_layers = max(blocks) + 1
    ids = {n: num_layers + 1 if p is None else 0 if p[0] == "stem" else p[1][0] + 1
           for n, p in positions.items()}
    return ids, num_layers


register_family("convnext_isotropic", ConvNeXtIsotropic)
for _name, (_depth, _dim) in {"small": (18, 384), "base": (18, 768), "large": (36, 1024)}.items():
    register_factory(f"convnext_isotropic_{_name}", ConvNeXtIsotropic,
                     f"Isotropic ConvNeXt-{_name[0].upper()}: {_depth} blocks of width {_dim}.",
                     depth=_depth, dim=_dim)

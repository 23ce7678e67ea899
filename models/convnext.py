"""ConvNeXt (Liu et al., "A ConvNet for the 2020s") in the official key layout.

Generalised so that every block may have its own MLP width and its own multi-scale depthwise
split: a pruned checkpoint of any shape rebuilds from its `arch`.
"""
import math

import torch.nn as nn

from common.errors import UserError

from .family import Family, match_layer_ids
from .fold import norm_into_conv, norm_into_linear
from .groups import (Group, Part, Producer, block_residual_parts, convnext_block, hidden_group, linear_parts,
                     norm_parts)
from .layers import (MS_BRANCHES, Block, LayerNorm2d, block_hidden_widths, default_branch_widths,
                     PooledHead, drop_path_rates, layer_scale_value, spans)
from .registry import register_factory, register_family
from .weights import rename_keys


class ConvNeXt(PooledHead, Family):
    first_conv = "downsample_layers.0.0"
    group_patterns = {
        "fine": dict(stem=r"^downsample_layers\.0\.", blocks=[(r"^downsample_layers\.(\d+)", (0,)),
                                                            (r"^stages\.(\d+)\.(\d+)", None), (r"^norm", (99999,))]),
        "coarse": dict(stem=r"^downsample_layers\.0\.", blocks=r"^(?:downsample_layers|stages)\.(\d+)")}

    """ConvNeXt: a 4x4/4 stem, then stages of blocks joined by LayerNorm + 2x2/2 downsampling.

    Args:
        in_chans (int): input image channels.
        num_classes (int): classifier outputs.
        depths (list[int]): blocks per stage.
        dims (list[int]): residual width per stage.
        hidden (list[list[int]] | None): MLP width of every block; None is 4 * dim.
        dw (str): "standard" (7x7 depthwise) or "multiscale" (3x3 | 7x7 | dilated 7x7 split).
        dw_branches (list[list[list[int]]] | None): multi-scale branch widths of every block;
            None is the 1:2:1 split.
        drop_path_rate (float): stochastic depth rate, rising linearly over the blocks.
        layer_scale_init_value (float): initial layer scale; <= 0 disables it.
        head_init_scale (float): multiplier on the initial head weights and bias.
        global_pool (str): "avg" (official), "max", "avgmax", or "" (the head at every position).
        drop_rate (float): dropout before the classifier (timm's argument; 0 as official).
    """

    def __init__(self, in_chans=3, num_classes=1000, depths=(3, 3, 9, 3), dims=(96, 192, 384, 768),
                 hidden=None, dw="standard", dw_branches=None, drop_path_rate=0.,
                 layer_scale_init_value=1e-6, head_init_scale=1., global_pool="avg", drop_rate=0.):
        super().__init__()
        depths, dims = list(map(int, depths)), list(map(int, dims))
        hidden = block_hidden_widths(hidden, depths, dims)
        branches = self._branch_widths(dw, dw_branches, depths, dims)
        self.downsample_layers = nn.ModuleList([nn.Sequential(
            nn.Conv2d(in_chans, dims[0], kernel_size=4, stride=4),
            LayerNorm2d(dims[0], eps=1e-6))])
        for i in range(len(dims) - 1):
            self.downsample_layers.append(nn.Sequential(
                LayerNorm2d(dims[i], eps=1e-6),
                nn.Conv2d(dims[i], dims[i + 1], kernel_size=2, stride=2)))
        rates = drop_path_rates(drop_path_rate, sum(depths))
        self.stages = nn.ModuleList()
        for s, (depth, dim) in enumerate(zip(depths, dims)):
            first = sum(depths[:s])
            self.stages.append(nn.Sequential(*[
                Block(dim, hidden[s][j], rates[first + j], layer_scale_init_value, branches[s][j])
                for j in range(depth)]))
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head = nn.Linear(dims[-1], num_classes)
        self.init_weights(head_init_scale)
        self.arch = {"family": "convnext", "depths": depths, "dims": dims, "hidden": hidden,
                     "dw": dw, "dw_branches": branches if dw == "multiscale" else None,
                     "layer_scale": layer_scale_init_value > 0,
                     "num_classes": num_classes, "in_chans": in_chans}
        self._init_protocol(global_pool, drop_rate)

    @staticmethod
    def _branch_widths(dw, dw_branches, depths, dims):
        if dw == "standard":
            return [[None] * n for n in depths]
        if dw != "multiscale":
            raise ValueError(f"dw must be 'standard' or 'multiscale', not {dw!r}")
        if dw_branches is None:
            return [[default_branch_widths(d)] * n for n, d in zip(depths, dims)]
        return [[list(map(int, b)) for b in stage] for stage in dw_branches]

    def _levels(self):
        """Stage i after its downsampling (the stem for i = 0), as timm's ConvNeXt taps them."""
        return [(f"stages.{i}", [f"downsample_layers.{i}", f"stages.{i}"],
                 lambda x, i=i: self.stages[i](self.downsample_layers[i](x))) for i in range(len(self.stages))]

    def _level_info(self):
        return [(d, 4 * 2 ** i) for i, d in enumerate(self.arch["dims"])]

    def fold(self):
        """Inference form (models/fold.py): each LayerNorm's affine goes into the layer after it
        (block norm -> pwconv1, downsampling norm -> its conv, final norm -> head); the stem's
        norm feeds the residual stream and stays. Returns self."""
        for block in (b for stage in self.stages for b in stage):
            block.norm = norm_into_linear(block.norm, block.pwconv1)
        for layer in list(self.downsample_layers)[1:]:
            layer[0] = norm_into_conv(layer[0], layer[1])
        self.norm = norm_into_linear(self.norm, self.head)
        return self

    # --- arch <-> state dict <-> channel groups -------------------------------------------

    @classmethod
    def from_arch(cls, arch, **kwargs):
        keys = ("depths", "dims", "hidden", "dw", "dw_branches", "num_classes", "in_chans")
        kwargs["layer_scale_init_value"] = layer_scale_value(arch.get("layer_scale", True), kwargs)
        return cls(**{k: arch[k] for k in keys if k in arch}, **kwargs)

    @staticmethod
    def named_dims(arch):
        """Shapes a budget may be named by (the Efficient ConvNeXt-T ones for a T-depth model)."""
        if list(arch.get("depths", [])) != OFFICIAL["convnext_tiny"][0]:
            return {}
        return {k[:-len("_pruned")]: v for k, v in EFFICIENT_DIMS.items() if k.endswith("_pruned")}

    @staticmethod
    def describe(arch):
        text = (f"ConvNeXt depths {arch['depths']} dims {arch['dims']}"
                + (" multi-scale" if arch.get("dw") == "multiscale" else ""))
        pruned = arch.get("hidden") and any(h != 4 * d for stage, d in zip(arch["hidden"], arch["dims"])
                                            for h in stage)
        return text + (" with pruned MLP widths" if pruned else "")

    @staticmethod
    def widths(arch):
        """(label, text) rows of the widths that pruning changes."""
        return [("blocks per stage", ",".join(map(str, arch["depths"]))),
                ("dims per stage", ",".join(map(str, arch["dims"]))),
                ("MLP width per stage", spans(arch["hidden"]))]

    @staticmethod
    def infer_arch(sd):
        """The arch of an official-layout state dict, or None when it is not one."""
        if "downsample_layers.0.0.weight" not in sd or "head.weight" not in sd:
            return None
        n_stages = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("stages."))
        depths = [len({k.split(".")[2] for k in sd if k.startswith(f"stages.{s}.")})
                  for s in range(n_stages)]
        dims = [sd[f"downsample_layers.{s}.{min(s, 1)}.weight"].shape[0] for s in range(n_stages)]
        hidden = [[sd[f"stages.{s}.{j}.pwconv1.weight"].shape[0] for j in range(n)]
                  for s, n in enumerate(depths)]
        multiscale = "stages.0.0.dwconv.weight" not in sd
        branches = [[[_width(sd, f"stages.{s}.{j}.dwconv.{name}.weight") for name in MS_BRANCHES]
                     for j in range(n)] for s, n in enumerate(depths)] if multiscale else None
        return {"family": "convnext", "depths": depths, "dims": dims, "hidden": hidden,
                "dw": "multiscale" if multiscale else "standard", "dw_branches": branches,
                "layer_scale": "stages.0.0.gamma" in sd,
                "num_classes": sd["head.weight"].shape[0],
                "in_chans": sd["downsample_layers.0.0.weight"].shape[1]}

    @staticmethod
    def channel_groups(arch):
        """A residual group per stage, a hidden group per block (docs/design.md section 5)."""
        groups = []
        for s, (depth, dim) in enumerate(zip(arch["depths"], arch["dims"])):
            entry = "downsample_layers.0.0" if s == 0 else f"downsample_layers.{s}.1"
            producers = [Producer((Part(f"{entry}.weight", 0),))]
            slices = list(linear_parts(entry, False))
            scales = []
            if s == 0:
                slices += norm_parts("downsample_layers.0.1")
                scales.append("downsample_layers.0.1.weight")
            for j in range(depth):
                block = f"stages.{s}.{j}"
                widths = arch["dw_branches"][s][j] if arch.get("dw") == "multiscale" else None
                p, sl, sc = block_residual_parts(block, arch.get("layer_scale", True),
                                                 _dw_parts(block, widths))
                producers += p
                slices += sl
                scales += sc
                groups.append(hidden_group(f"{block}.hidden", block, arch["hidden"][s][j], s))
            last = s == len(arch["dims"]) - 1
            consumer_norm = "norm" if last else f"downsample_layers.{s + 1}.0"
            slices += norm_parts(consumer_norm)
            slices += linear_parts("head" if last else f"downsample_layers.{s + 1}.1", True)
            scales.append(f"{consumer_norm}.weight")
            groups.append(Group(f"stages.{s}.residual", "residual", dim, tuple(producers),
                                tuple(slices), tuple(scales), stage=s))
        return groups

    @staticmethod
    def removable_blocks(arch):
        """Every block: the downsampling layers sit between stages, outside the blocks."""
        return [convnext_block(f"stages.{s}", j, s, arch.get("layer_scale", True))
                for s, depth in enumerate(arch["depths"]) for j in range(depth)]

    @staticmethod
    def example_arch():
        """Two stages, per-block MLP widths and multi-scale branches: every kind of part."""
        return {"family": "convnext", "depths": [1, 2], "dims": [8, 12], "hidden": [[32], [48, 20]],
                "dw": "multiscale", "dw_branches": [[[2, 4, 2]], [[3, 6, 3], [2, 8, 2]]],
                "layer_scale": True, "num_classes": 3, "in_chans": 3}

    @staticmethod
    def from_foreign(sd):
        """timm's ConvNeXt layout (its hub weights, timm's train.py) renamed into ours; its
        conv-MLP variants (atto..nano) too: a 1x1 conv over LayerNorm2d is our Linear MLP."""
        if "stem.0.weight" not in sd or not any(".blocks." in k for k in sd):
            return None
        out, unknown = rename_keys(sd, TIMM_NAMES, reverse=True)
        why = _timm_variant_problem(out, unknown)
        if why:
            raise UserError(f"these timm ConvNeXt weights are a variant this toolkit cannot rebuild: {why}")
        return {k: v.flatten(1) if k.endswith(("pwconv1.weight", "pwconv2.weight")) else v
                for k, v in out.items()}

    @staticmethod
    def timm_export(arch, sd):
        """timm's own ConvNeXt builds a shape with 7x7 depthwise convs and MLP width 4 x dim
        (its class has no MLP ratio): the Efficient ConvNeXt shapes."""
        if arch.get("dw") == "multiscale" or any(h != 4 * d for stage, d in zip(arch["hidden"], arch["dims"])
                                                 for h in stage):
            return None
        name = next((n for n, (depths, _) in OFFICIAL.items() if depths == arch["depths"]), "convnext_tiny")
        model_args = {"depths": arch["depths"], "dims": arch["dims"],
                      **({} if arch.get("layer_scale", True) else {"ls_init_value": None}),
                      **({"in_chans": arch["in_chans"]} if arch.get("in_chans", 3) != 3 else {})}
        return name, model_args, rename_keys(sd, TIMM_NAMES)[0]

    @staticmethod
    def layer_ids(param_names):
        """The official rule, in the official and in timm's key layout: the stem is layer 0,
        each stage is cut into chunks of 3 consecutive blocks (one id each), a stage's
        downsampling layer shares the id of its first chunk, norm and head come last."""
        return match_layer_ids(param_names, _LAYOUT, _hierarchical_ids)


# Our names -> timm's ConvNeXt names ({s} stage, {j} block, {i} layer in a downsampling step).
TIMM_NAMES = (("downsample_layers.0.0", "stem.0"), ("downsample_layers.0.1", "stem.1"),
              ("downsample_layers.{s}.{i}", "stages.{s}.downsample.{i}"),
              ("stages.{s}.{j}.dwconv", "stages.{s}.blocks.{j}.conv_dw"),
              ("stages.{s}.{j}.norm", "stages.{s}.blocks.{j}.norm"),
              ("stages.{s}.{j}.pwconv1", "stages.{s}.blocks.{j}.mlp.fc1"),
              ("stages.{s}.{j}.pwconv2", "stages.{s}.blocks.{j}.mlp.fc2"),
              ("stages.{s}.{j}.gamma", "stages.{s}.blocks.{j}.gamma"),
              ("norm", "head.norm"), ("head", "head.fc"))
# timm ConvNeXts with our keys but other numerics (LayerNorm eps 1e-5, tanh GELU): never read as ours.
TIMM_OTHER_NUMERICS = {((3, 4, 30, 3), (384, 768, 1536, 3072)): "convnext_xxlarge",
                       ((1, 2, 4, 2), (24, 32, 48, 64)): "test_convnext",
                       ((1, 1, 1, 1), (32, 64, 96, 128)): "test_convnext2"}
BLOCKS_PER_LAYER = 3  # official layer decay: "each group is three consecutive blocks"
_LAYOUT = [  # (regex, kind) in the official and timm's layouts; groups: stage / block indices
    (r"^downsample_layers\.0\.", "stem"), (r"^stem[._]", "stem"),
    (r"^downsample_layers\.(\d+)\.", "down"), (r"^stages\.(\d+)\.downsample\.", "down"),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.", "block"), (r"^stages\.(\d+)\.(\d+)\.", "block"),
]


def _hierarchical_ids(positions):
    blocks = [p[1] for p in positions.values() if p and p[0] == "block"]
    if not blocks:
        return None
    depths = {}
    for s, j in blocks:
        depths[s] = max(depths.get(s, 0), j + 1)
    first, next_id = {}, 1  # stage -> layer id of its first chunk
    for s in sorted(depths):
        first[s] = next_id
        next_id += math.ceil(depths[s] / BLOCKS_PER_LAYER)
    num_layers = next_id - 1

    def layer_id(p):
        if p is None:
            return num_layers + 1
        kind, idx = p
        if kind == "stem":
            return 0
        if kind == "down":
            return first.get(idx[0], num_layers + 1)
        return first[idx[0]] + idx[1] // BLOCKS_PER_LAYER

    return {n: layer_id(p) for n, p in positions.items()}, num_layers


def _timm_variant_problem(renamed, unknown):
    """Why timm ConvNeXt weights (renamed into our layout) are not a shape of ours, or None."""
    if unknown:
        return (f"it holds {unknown[0]} ({len(unknown)} tensors no ConvNeXt of ours has: an overlapping "
                "stem, GRN, a norm-first or an MLP head)")
    stem = renamed.get("downsample_layers.0.0.weight")
    if stem is None or stem.ndim != 4 or stem.shape[-1] != 4:
        return "its stem is not a 4x4 patchify conv (an overlapping stem)"
    if any(k.endswith("dwconv.weight") and v.shape[-1] != 7 for k, v in renamed.items()):
        return "its depthwise convs are not 7x7"
    if any(k.endswith("norm.weight") and k[:-len("weight")] + "bias" not in renamed for k in renamed):
        return "its norms have no bias (an RMSNorm variant)"
    arch = ConvNeXt.infer_arch(renamed)
    other = arch and TIMM_OTHER_NUMERICS.get((tuple(arch["depths"]), tuple(arch["dims"])))
    if other:  # the weights cannot tell; these shapes are timm's with other norms
        return (f"its shape is timm's {other}, built with LayerNorm eps 1e-5 (ours: 1e-6); give "
                f"--model {other} to use timm's class")
    return None


def _width(sd, key):
    return sd[key].shape[0] if key in sd else 0


def _dw_parts(block, widths):
    """Depthwise conv slices of a block; a multi-scale branch holds a sub-range of channels."""
    if widths is None:
        return (Part(f"{block}.dwconv.weight", 0), Part(f"{block}.dwconv.bias", 0))
    parts, start = [], 0
    for name, w in zip(MS_BRANCHES, widths):
        if w > 0:
            for t in ("weight", "bias"):
                parts.append(Part(f"{block}.dwconv.{name}.{t}", 0, start, start + w))
        start += w
    return tuple(parts)


register_family("convnext", ConvNeXt)

OFFICIAL = {  # name: (depths, dims)
    "convnext_tiny": ([3, 3, 9, 3], [96, 192, 384, 768]),
    "convnext_small": ([3, 3, 27, 3], [96, 192, 384, 768]),
    "convnext_base": ([3, 3, 27, 3], [128, 256, 512, 1024]),
    "convnext_large": ([3, 3, 27, 3], [192, 384, 768, 1536]),
    "convnext_xlarge": ([3, 3, 27, 3], [256, 512, 1024, 2048]),
}
# Efficient ConvNeXt-T (Singh & Plumbley): operator-norm pruned shapes of ConvNeXt-T.
EFFICIENT_DIMS = {
    "unpruned": [96, 192, 384, 768],
    "21M_pruned": [96, 192, 384, 576],
    "16M_pruned": [96, 192, 384, 384],
    "13M_pruned": [96, 192, 384, 192],
    "3M_pruned": [32, 64, 128, 256],
}
DATASET_CLASSES = {"cifar10": 10, "tinyimagenet": 200}


def timm_default_cfgs():
    """timm's pretrained tags of the names ours replace: timm's registry reads a module's
    `default_cfgs` when a name is registered (models.registry sets it from this, once timm is
    imported), so `convnext_tiny.fb_in22k` keeps its hub weights."""
    import timm.models.convnext as timm_convnext
    return {name: timm_convnext.default_cfgs[name] for name in OFFICIAL}


def _register():
    for name, (depths, dims) in OFFICIAL.items():
        register_factory(name, ConvNeXt, f"ConvNeXt {name[9:]}: depths {depths}, dims {dims}.",
                         depths=depths, dims=dims)
    tiny_depths = OFFICIAL["convnext_tiny"][0]
    for variant, dims in EFFICIENT_DIMS.items():
        for data, classes in DATASET_CLASSES.items():
            register_factory(f"convnext_tiny_{variant}_{data}", ConvNeXt,
                             f"Efficient ConvNeXt-T {variant} for {data}: dims {dims}.",
                             depths=tiny_depths, dims=dims, num_classes=classes)
    for suffix, classes in [("", 1000)] + [(f"_{d}", c) for d, c in DATASET_CLASSES.items()]:
        register_factory(f"convnext_ms_tiny{suffix}", ConvNeXt,
                         "ConvNeXt-T with multi-scale depthwise convs (3x3 | 7x7 | 7x7 dilated, 1:2:1).",
                         depths=tiny_depths, dims=OFFICIAL["convnext_tiny"][1], dw="multiscale",
                         num_classes=classes)


_register()

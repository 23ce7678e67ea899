"""Pre-activation CIFAR ResNets (He et al., "Identity Mappings in Deep Residual Networks"), as
the Pruning Filters seed trains them: `preresnet110`.

Three stages of n pre-activation BasicBlocks (BN-ReLU-conv3x3-BN-ReLU-conv3x3, 16 / 32 / 64
channels), a 1x1 projection shortcut where a stage starts with a stride or a width change,
then a final BN-ReLU, global average pooling and a linear head. Keys follow the common
PyTorch CIFAR layout (`layer<s>.<j>.bn1`, `downsample.0`, final `bn`).

How the groups treat the pre-activation BatchNorm: each block's `bn1` normalises the residual
stream itself (the sum of every earlier block's output), not a channel one conv produces.
The streams stay whole, as in our ResNet and the seed, so `bn1`, the shortcut convs and the
final `bn` are never cut; a block's group is its inner channels: conv1's rows, `bn2` (their
scale factors) and conv2's columns.
"""
import torch.nn as nn
import torch.nn.functional as F

from .family import Family
from .fold import bn_into_conv
from .groups import Group, Part, Producer, bn_block
from .layers import spans
from .protocol import TimmProtocol
from .resnet_cifar import stage_level_info
from .registry import register_factory, register_family

WIDTHS = (16, 32, 64)
BN_TENSORS = ("weight", "bias", "running_mean", "running_var")


def inner_group(block, width, stage, conv1="conv1", bn2="bn2", conv2="conv2"):
    """A pre-activation block's inner channels: conv1 rows, the BN after it, conv2 columns."""
    slices = ((Part(f"{block}.{conv1}.weight", 0),) + tuple(Part(f"{block}.{bn2}.{t}", 0) for t in BN_TENSORS)
              + (Part(f"{block}.{conv2}.weight", 1),))
    return Group(block, "hidden", width, (Producer((Part(f"{block}.{conv1}.weight", 0),)),), slices,
                 (f"{block}.{bn2}.weight",), stage=stage)


def stage_depths(sd, prefix):
    """Blocks per stage of a state dict whose blocks are `<prefix><s>.<j>.` (s from 1)."""
    depths, s = [], 1
    while f"{prefix}{s}.0.conv1.weight" in sd:
        depths.append(len({k[len(f"{prefix}{s}."):].split(".")[0] for k in sd if k.startswith(f"{prefix}{s}.")}))
        s += 1
    return depths


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3, plus the block input (projected where shapes change)."""

    def __init__(self, in_planes, planes, inner, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, inner, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(inner)
        self.conv2 = nn.Conv2d(inner, planes, 3, 1, 1, bias=False)
        self.downsample = (nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False))
                           if stride != 1 or in_planes != planes else None)

    def forward(self, x):
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        return out + (x if self.downsample is None else self.downsample(x))

    def fold(self):
        self.conv1, self.bn2 = bn_into_conv(self.conv1, self.bn2), nn.Identity()


class PreResNetCifar(TimmProtocol, nn.Module, Family):
    """PreResNet-(6n+2) for 32 px images.

    Args:
        depths (list[int]): blocks per stage (n, n, n).
        inner (list[list[int]] | None): inner width of every block; None is the stage width.
        num_classes (int): classifier outputs.
        in_chans (int): input image channels.
        drop_path_rate, layer_scale_init_value, head_init_scale: main.py passes these to every
            model; this ResNet has no drop path (only 0 is accepted) and no layer scale (ignored).
    """

    classifier_name, first_conv, default_input_size = "fc", "conv1", 32
    group_patterns = {"fine": dict(stem=r"^conv1", blocks=[(r"^layer(\d+)\.(\d+)", None), (r"^bn\.", (99999,))]),
                      "coarse": dict(stem=r"^conv1", blocks=[(r"^layer(\d+)", None), (r"^bn\.", (99999,))])}

    def __init__(self, depths=(18, 18, 18), inner=None, num_classes=10, in_chans=3, drop_path_rate=0.,
                 layer_scale_init_value=None, head_init_scale=1., global_pool="avg", drop_rate=0.):
        super().__init__()
        if drop_path_rate:
            raise ValueError("this ResNet has no drop path: use --drop_path 0")
        depths = list(map(int, depths))
        inner = [[w] * n for n, w in zip(depths, WIDTHS)] if inner is None else [list(map(int, s)) for s in inner]
        self.conv1 = nn.Conv2d(in_chans, WIDTHS[0], 3, 1, 1, bias=False)
        c = WIDTHS[0]
        for s, (n, width) in enumerate(zip(depths, WIDTHS)):
            blocks = []
            for j in range(n):
                blocks.append(PreActBlock(c, width, inner[s][j], 2 if s > 0 and j == 0 else 1))
                c = width
            setattr(self, f"layer{s + 1}", nn.Sequential(*blocks))
        self.bn = nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        self.fc.weight.data.mul_(head_init_scale)
        self.arch = {"family": "preresnet_cifar", "depths": depths, "inner": inner,
                     "num_classes": num_classes, "in_chans": in_chans}
        self._init_protocol(global_pool, drop_rate)

    def _levels(self):
        """The stem conv, then each stage (models/protocol.py)."""
        return self._stage_levels(("conv1", ["conv1"], self.conv1), ("layer1", "layer2", "layer3"))

    def _level_info(self):
        return stage_level_info(WIDTHS)

    def _final(self, x):
        return F.relu(self.bn(x))  # pre-activation: the last stage's output is normalised here

    head_key = "fc"

    def fold(self):
        """Inference form: each block's bn2 folded into its conv1. bn1 and the final bn read a
        sum of blocks (the stream) and feed a ReLU, so no conv is next to them: they stay."""
        for block in (b for s in (self.layer1, self.layer2, self.layer3) for b in s):
            block.fold()
        return self

    # --- arch <-> state dict <-> channel groups -------------------------------------------
    @classmethod
    def from_arch(cls, arch, **kwargs):
        return cls(depths=arch["depths"], inner=arch.get("inner"), num_classes=arch["num_classes"],
                   in_chans=arch.get("in_chans", 3), **kwargs)

    @staticmethod
    def describe(arch):
        pruned = any(w != width for stage, width in zip(arch["inner"], WIDTHS) for w in stage)
        depth = 6 * arch["depths"][0] + 2 if len(set(arch["depths"])) == 1 else arch["depths"]
        return f"CIFAR PreResNet-{depth}" + (" with pruned inner widths" if pruned else "")

    @staticmethod
    def widths(arch):
        return [("blocks per stage", ",".join(map(str, arch["depths"]))), ("inner width per stage", spans(arch["inner"]))]

    @staticmethod
    def infer_arch(sd):
        """The arch of a state dict in this layout, or None when it is not one."""
        if "layer1.0.bn2.weight" not in sd or "bn.weight" not in sd or "fc.weight" not in sd or "bn1.weight" in sd:
            return None
        depths = stage_depths(sd, "layer")
        if len(depths) != 3 or [sd[f"layer{s + 1}.0.conv2.weight"].shape[0] for s in range(3)] != list(WIDTHS):
            return None
        inner = [[sd[f"layer{s + 1}.{j}.conv1.weight"].shape[0] for j in range(n)] for s, n in enumerate(depths)]
        return {"family": "preresnet_cifar", "depths": depths, "inner": inner,
                "num_classes": sd["fc.weight"].shape[0], "in_chans": sd["conv1.weight"].shape[1]}

    @staticmethod
    def channel_groups(arch):
        """One group per block, `layer<s>.<j>`: its inner channels (conv1 rows, bn2, conv2
        columns); bn2's weights are the scale factors. The streams and bn1 stay whole."""
        return [inner_group(f"layer{s + 1}.{j}", width, s)
                for s, stage in enumerate(arch["inner"]) for j, width in enumerate(stage)]

    @staticmethod
    def removable_blocks(arch):
        """Blocks with an identity shortcut: all but the first of stages 2 and 3 (projected)."""
        return [bn_block(f"layer{s + 1}", j, s, True)
                for s, n in enumerate(arch["depths"]) for j in range(n) if s == 0 or j > 0]

    @staticmethod
    def example_arch():
        return {"family": "preresnet_cifar", "depths": [1, 2, 1], "inner": [[5], [7, 32], [3]],
                "num_classes": 3, "in_chans": 3}


register_family("preresnet_cifar", PreResNetCifar)
register_factory("preresnet110", PreResNetCifar,
                 "CIFAR PreResNet-110: 3 stages of 18 pre-activation BasicBlocks (the Pruning Filters seed's).",
                 depths=[18] * 3, num_classes=10)

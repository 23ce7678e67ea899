"""CIFAR ResNets (He et al.) as in Pruning Filters for Efficient ConvNets (Li et al.).

Three stages of n BasicBlocks (16, 32, 64 channels), conv-BN-ReLU, the parameter-free
"option A" shortcut (stride-2 subsampling and zero-padded channels), global average pooling
and a linear head. The `arch` records every block's inner width (conv1 out = conv2 in), the
channels Li et al. prune.

Why the residual streams stay whole: an option-A shortcut adds the block input, zero-padded
on both sides, to the block output; a channel of the stream is therefore fixed by its
position in every block of the stage and in the padding of the next stage's first block.
Cutting stream channels would need one index set for the stage, the padding recomputed from
it, and the next stage's padded positions to match; the seed and Li et al. leave the streams
whole, and so do we. Only the inner channels of each block are groups.
"""
import torch.nn as nn
import torch.nn.functional as F

from .family import Family
from .fold import bn_into_conv
from .groups import Group, Part, Producer, bn_block
from .layers import spans
from .protocol import TimmProtocol
from .registry import register_factory, register_family

WIDTHS = (16, 32, 64)
BN_TENSORS = ("weight", "bias", "running_mean", "running_var")


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus the option-A shortcut, then ReLU."""

    def __init__(self, in_planes, planes, inner, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, inner, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(inner)
        self.conv2 = nn.Conv2d(inner, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.stride, self.pad = stride, planes - in_planes

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        shortcut = x
        if self.stride != 1 or self.pad:
            # (N, C, H, W) -> (N, C + pad, H / stride, W / stride), zeros on both channel sides
            half = self.pad // 2
            shortcut = F.pad(x[:, :, ::self.stride, ::self.stride], (0, 0, 0, 0, half, self.pad - half))
        return F.relu(out + shortcut)


def stage_level_info(widths):
    """(channels, reduction) of the stem and of each stage of a 3-stage CIFAR net."""
    return [(widths[0], 1)] + [(w, 2 ** s) for s, w in enumerate(widths)]


class ResNetCifar(TimmProtocol, nn.Module, Family):
    classifier_name, first_conv, default_input_size = "fc", "conv1", 32
    group_patterns = {"fine": dict(stem=r"^conv1|^bn1", blocks=r"^layer(\d+)\.(\d+)"),
                      "coarse": dict(stem=r"^conv1|^bn1", blocks=r"^layer(\d+)")}

    """ResNet-(6n+2) for 32 px images.

    Args:
        depths (list[int]): blocks per stage (n, n, n).
        inner (list[list[int]] | None): inner width of every block; None is the stage width.
        num_classes (int): classifier outputs.
        in_chans (int): input image channels.
        drop_path_rate, layer_scale_init_value, head_init_scale: main.py passes these to every
            model; this ResNet has no drop path (only 0 is accepted) and no layer scale (ignored).
    """

    def __init__(self, depths=(9, 9, 9), inner=None, num_classes=10, in_chans=3, drop_path_rate=0.,
                 layer_scale_init_value=None, head_init_scale=1., global_pool="avg", drop_rate=0.):
        super().__init__()
        if drop_path_rate:
            raise ValueError("this ResNet has no drop path: use --drop_path 0")
        depths = list(map(int, depths))
        inner = [[w] * n for n, w in zip(depths, WIDTHS)] if inner is None else [list(map(int, s)) for s in inner]
        self.conv1 = nn.Conv2d(in_chans, WIDTHS[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(WIDTHS[0])
        c = WIDTHS[0]
        for s, (n, width) in enumerate(zip(depths, WIDTHS)):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(c, width, inner[s][j], 2 if s > 0 and j == 0 else 1))
                c = width
            setattr(self, f"layer{s + 1}", nn.Sequential(*blocks))
        self.fc = nn.Linear(c, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        self.fc.weight.data.mul_(head_init_scale)
        self.arch = {"family": "resnet_cifar", "depths": depths, "inner": inner,
                     "num_classes": num_classes, "in_chans": in_chans}
        self._init_protocol(global_pool, drop_rate)

    def _levels(self):
        """The stem's activation, then each stage (models/protocol.py)."""
        return self._stage_levels(("bn1", ["conv1", "bn1"], lambda x: F.relu(self.bn1(self.conv1(x)))),
                                  ("layer1", "layer2", "layer3"))

    def _level_info(self):
        return stage_level_info(WIDTHS)

    head_key = "fc"

    def fold(self):
        """Inference form: every BatchNorm folded into the conv before it (models/fold.py)."""
        self.conv1, self.bn1 = bn_into_conv(self.conv1, self.bn1), nn.Identity()
        for block in (b for s in (self.layer1, self.layer2, self.layer3) for b in s):
            block.conv1, block.bn1 = bn_into_conv(block.conv1, block.bn1), nn.Identity()
            block.conv2, block.bn2 = bn_into_conv(block.conv2, block.bn2), nn.Identity()
        return self

    # --- arch <-> state dict <-> channel groups -------------------------------------------
    @classmethod
    def from_arch(cls, arch, **kwargs):
        return cls(depths=arch["depths"], inner=arch.get("inner"), num_classes=arch["num_classes"],
                   in_chans=arch.get("in_chans", 3), **kwargs)

    @staticmethod
    def describe(arch):
        pruned = any(w != width for stage, width in zip(arch["inner"], WIDTHS) for w in stage)
        return (f"CIFAR ResNet-{6 * arch['depths'][0] + 2 if len(set(arch['depths'])) == 1 else arch['depths']}"
                + (" with pruned inner widths" if pruned else ""))

    @staticmethod
    def widths(arch):
        return [("blocks per stage", ",".join(map(str, arch["depths"]))), ("inner width per stage", spans(arch["inner"]))]

    @staticmethod
    def infer_arch(sd):
        """The arch of a state dict in this layout, or None when it is not one."""
        if ("layer1.0.conv1.weight" not in sd or "fc.weight" not in sd or "bn1.weight" not in sd
                or "layer4.0.conv1.weight" in sd):  # no stem bn1: a pre-activation ResNet
            return None
        if sd["conv1.weight"].shape[0] != WIDTHS[0] or sd["conv1.weight"].shape[-1] != 3:
            return None  # e.g. an ImageNet ResNet (7x7 stem, 64 channels)
        depths = [len({k.split(".")[1] for k in sd if k.startswith(f"layer{s}.")}) for s in (1, 2, 3)]
        inner = [[sd[f"layer{s + 1}.{j}.conv1.weight"].shape[0] for j in range(n)]
                 for s, n in enumerate(depths)]
        return {"family": "resnet_cifar", "depths": depths, "inner": inner,
                "num_classes": sd["fc.weight"].shape[0], "in_chans": sd["conv1.weight"].shape[1]}

    @staticmethod
    def channel_groups(arch):
        """One group per block, `layer<s>.<j>`: its inner channels (conv1 rows, bn1, conv2
        columns); bn1's weights are the scale factors. Residual streams stay whole."""
        groups = []
        for s, stage in enumerate(arch["inner"]):
            for j, width in enumerate(stage):
                b = f"layer{s + 1}.{j}"
                slices = ((Part(f"{b}.conv1.weight", 0),)
                          + tuple(Part(f"{b}.bn1.{t}", 0) for t in BN_TENSORS)
                          + (Part(f"{b}.conv2.weight", 1),))
                groups.append(Group(b, "hidden", width, (Producer((Part(f"{b}.conv1.weight", 0),)),),
                                    slices, (f"{b}.bn1.weight",), stage=s))
        return groups

    @staticmethod
    def removable_blocks(arch):
        """Blocks with an identity shortcut: all but the first of stages 2 and 3 (stride 2, padded)."""
        return [bn_block(f"layer{s + 1}", j, s, False)
                for s, n in enumerate(arch["depths"]) for j in range(n) if s == 0 or j > 0]

    @staticmethod
    def example_arch():
        return {"family": "resnet_cifar", "depths": [1, 2, 1], "inner": [[5], [7, 32], [3]],
                "num_classes": 3, "in_chans": 3}


register_family("resnet_cifar", ResNetCifar)
for _n in (3, 5, 7, 9, 18):
    register_factory(f"resnet{6 * _n + 2}", ResNetCifar,
                     f"CIFAR ResNet-{6 * _n + 2}: 3 stages of {_n} BasicBlocks, option-A shortcuts.",
                     depths=[_n] * 3, num_classes=10)

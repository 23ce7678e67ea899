"""Wide ResNets for CIFAR (Zagoruyko & Komodakis), as the Pruning Filters seed trains them:
`wrn_28_10` (depth 28, widen factor 10: 36.5M parameters for 10 classes).

Three groups of n = (depth - 4) / 6 pre-activation blocks, 16k / 32k / 64k channels, dropout
between the two 3x3 convs (`wrn_28_10_dropout`: 0.3, the paper's CIFAR setting), a 1x1
shortcut where the width or stride changes, then BN-ReLU, global average pooling and a linear
head. Keys are the reference implementation's (`block<s>.layer.<j>.bn1`, `convShortcut`,
final `bn1`), so its published state dicts load.

One difference from our PreResNet, kept from the reference: where a block has a shortcut
conv, it reads the block's activated input relu(bn1(x)), not x. Groups treat it as in the
PreResNet (streams whole, bn1 never cut); a block's group is its inner channels.
"""
import torch.nn as nn
import torch.nn.functional as F

from .family import Family
from .fold import bn_into_conv
from .groups import bn_block
from .layers import spans
from .preresnet_cifar import inner_group, stage_depths
from .protocol import TimmProtocol
from .resnet_cifar import stage_level_info
from .registry import register_factory, register_family


class WideBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-dropout-conv3x3 plus the (projected, activated) input."""

    def __init__(self, in_planes, planes, inner, stride, dropout):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, inner, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(inner)
        self.conv2 = nn.Conv2d(inner, planes, 3, 1, 1, bias=False)
        self.dropout = dropout
        self.convShortcut = (nn.Conv2d(in_planes, planes, 1, stride, bias=False)
                             if stride != 1 or in_planes != planes else None)

    def forward(self, x):
        act = F.relu(self.bn1(x))
        out = F.relu(self.bn2(self.conv1(act)))
        out = self.conv2(F.dropout(out, self.dropout, self.training) if self.dropout else out)
        return out + (x if self.convShortcut is None else self.convShortcut(act))

    def fold(self):
        self.conv1, self.bn2 = bn_into_conv(self.conv1, self.bn2), nn.Identity()


class WideResNetCifar(TimmProtocol, nn.Module, Family):
    """WRN-depth-k for 32 px images.

    Args:
        depths (list[int]): blocks per group (n, n, n); depth = 6n + 4.
        widen (int): width multiplier k (group widths 16k, 32k, 64k).
        inner (list[list[int]] | None): inner width of every block; None is the group width.
        dropout (float): dropout rate between each block's convs (training only).
        num_classes, in_chans: classifier outputs, input image channels.
        drop_path_rate, layer_scale_init_value, head_init_scale: main.py passes these to every
            model; no drop path (only 0 is accepted), no layer scale (ignored).
    """

    classifier_name, first_conv, default_input_size = "fc", "conv1", 32
    group_patterns = {"fine": dict(stem=r"^conv1", blocks=[(r"^block(\d+)\.layer\.(\d+)", None), (r"^bn1", (99999,))]),
                      "coarse": dict(stem=r"^conv1", blocks=[(r"^block(\d+)", None), (r"^bn1", (99999,))])}

    def __init__(self, depths=(4, 4, 4), widen=10, inner=None, dropout=0., num_classes=10, in_chans=3,
                 drop_path_rate=0., layer_scale_init_value=None, head_init_scale=1., global_pool="avg", drop_rate=0.):
        super().__init__()
        if drop_path_rate:
            raise ValueError("this Wide ResNet has no drop path: use --drop_path 0 (its dropout is "
                             "part of the model: wrn_28_10_dropout)")
        if not 0 <= float(dropout) < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        depths, widen = list(map(int, depths)), int(widen)
        widths = [16 * widen, 32 * widen, 64 * widen]
        inner = [[w] * n for n, w in zip(depths, widths)] if inner is None else [list(map(int, s)) for s in inner]
        self.conv1 = nn.Conv2d(in_chans, 16, 3, 1, 1, bias=False)
        c = 16
        for s, (n, width) in enumerate(zip(depths, widths)):
            blocks = [WideBlock(c if j == 0 else width, width, inner[s][j], 2 if s > 0 and j == 0 else 1,
                                float(dropout)) for j in range(n)]
            c = width
            setattr(self, f"block{s + 1}", nn.Module())
            getattr(self, f"block{s + 1}").layer = nn.Sequential(*blocks)
        self.bn1 = nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.fc.bias)
        self.fc.weight.data.mul_(head_init_scale)
        self.arch = {"family": "wrn_cifar", "depths": depths, "widen": widen, "inner": inner,
                     "num_classes": num_classes, "in_chans": in_chans}
        if dropout:  # kept in checkpoints, so pruning and fine-tuning keep it
            self.arch["dropout"] = float(dropout)
        self._init_protocol(global_pool, drop_rate)

    def _levels(self):
        """The stem conv, then each stage (models/protocol.py)."""
        return self._stage_levels(("conv1", ["conv1"], self.conv1), ("block1.layer", "block2.layer", "block3.layer"))

    def _level_info(self):
        w = self.arch["widen"]
        return [(16, 1)] + stage_level_info((16 * w, 32 * w, 64 * w))[1:]

    def _final(self, x):
        return F.relu(self.bn1(x))  # pre-activation: the last stage's output is normalised here

    def blocks(self):
        return [b for s in (1, 2, 3) for b in getattr(self, f"block{s}").layer]

    head_key = "fc"

    def fold(self):
        """Inference form: each block's bn2 folded into its conv1 (bn1 and the final BN read
        the stream and feed a ReLU: they stay)."""
        for block in self.blocks():
            block.fold()
        return self

    # --- arch <-> state dict <-> channel groups -------------------------------------------
    @classmethod
    def from_arch(cls, arch, **kwargs):
        return cls(depths=arch["depths"], widen=arch["widen"], inner=arch.get("inner"),
                   dropout=arch.get("dropout", 0.), num_classes=arch["num_classes"],
                   in_chans=arch.get("in_chans", 3), **kwargs)

    @staticmethod
    def describe(arch):
        full = [[16 * arch["widen"] * 2 ** s] * n for s, n in enumerate(arch["depths"])]
        depth = 6 * arch["depths"][0] + 4 if len(set(arch["depths"])) == 1 else arch["depths"]
        return (f"CIFAR WRN-{depth}-{arch['widen']}" + (f", dropout {arch['dropout']:g}" if arch.get("dropout") else "")
                + (" with pruned inner widths" if arch["inner"] != full else ""))

    @staticmethod
    def widths(arch):
        return [("blocks per group", ",".join(map(str, arch["depths"]))), ("inner width per group", spans(arch["inner"]))]

    @staticmethod
    def infer_arch(sd):
        """The arch of a state dict in this layout, or None when it is not one. The dropout
        rate leaves no trace in weights: an inferred arch has none (evaluation is the same;
        our checkpoints store it in their arch)."""
        if "block1.layer.0.conv1.weight" not in sd or "fc.weight" not in sd:
            return None
        depths = stage_depths({k.replace(".layer.", "."): v for k, v in sd.items()}, "block")
        widen = sd["block1.layer.0.conv2.weight"].shape[0] // 16
        if len(depths) != 3 or [sd[f"block{s + 1}.layer.0.conv2.weight"].shape[0] for s in range(3)] \
                != [16 * widen * 2 ** s for s in range(3)]:
            return None
        inner = [[sd[f"block{s + 1}.layer.{j}.conv1.weight"].shape[0] for j in range(n)]
                 for s, n in enumerate(depths)]
        return {"family": "wrn_cifar", "depths": depths, "widen": widen, "inner": inner,
                "num_classes": sd["fc.weight"].shape[0], "in_chans": sd["conv1.weight"].shape[1]}

    @staticmethod
    def channel_groups(arch):
        """One group per block, `block<s>.layer.<j>`: its inner channels (conv1 rows, bn2,
        conv2 columns); bn2's weights are the scale factors. The streams and bn1 stay whole."""
        return [inner_group(f"block{s + 1}.layer.{j}", width, s)
                for s, stage in enumerate(arch["inner"]) for j, width in enumerate(stage)]

    @staticmethod
    def removable_blocks(arch):
        """Blocks with an identity shortcut: a stage's first block projects (stride 2, or 16 ->
        16 x widen channels) unless the widths agree."""
        return [bn_block(f"block{s + 1}.layer", j, s, True) for s, n in enumerate(arch["depths"])
                for j in range(n) if j > 0 or (s == 0 and arch["widen"] == 1)]

    @staticmethod
    def example_arch():
        return {"family": "wrn_cifar", "depths": [1, 2, 1], "widen": 1, "inner": [[5], [7, 32], [3]],
                "num_classes": 3, "in_chans": 3}


register_family("wrn_cifar", WideResNetCifar)
register_factory("wrn_28_10", WideResNetCifar,
                 "CIFAR Wide ResNet 28-10: 3 groups of 4 pre-activation blocks, 160 / 320 / 640 channels.",
                 depths=[4] * 3, widen=10, num_classes=10)
register_factory("wrn_28_10_dropout", WideResNetCifar,
                 "CIFAR Wide ResNet 28-10 with dropout 0.3 between each block's convs (the paper's CIFAR runs).",
                 depths=[4] * 3, widen=10, dropout=0.3, num_classes=10)

"""VGG with BatchNorm for CIFAR (the Network Slimming and Pruning Filters seeds' network).

The `arch` is the layer list of the slimming seed's pruned-architecture table: a width per
3x3 conv (no bias, then BatchNorm and ReLU) and "M" for a 2x2 max-pool; then global average
pooling, optional hidden linear layers (`hidden`: Linear-BN-ReLU each) and one linear layer.
Keys follow the slimming seed (`feature.N`, `classifier`), so its state dicts load unchanged.

`vgg16_cifar` is Li et al.'s CIFAR VGG-16 (Pruning Filters): the 13 BN convs and one
512-unit hidden layer before the classifier, 15.0M parameters. It is not called `vgg16`:
that name stays timm's ImageNet VGG. The hidden layer is not a channel group (Li et al.
prune conv filters only); the last conv's group cuts its input columns.
"""
import torch.nn as nn

from .fold import bn_into_conv, bn_into_linear
from .groups import Group, Part, Producer
from .family import Family
from .protocol import TimmProtocol
from .registry import register_factory, register_family

CONFIGS = {
    "vgg11_bn_cifar": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
    "vgg13_bn_cifar": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
    "vgg16_bn_cifar": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512],
    "vgg19_bn_cifar": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
                       512, 512, 512, 512],
}
BN_TENSORS = ("weight", "bias", "running_mean", "running_var")


class VGGCifar(TimmProtocol, nn.Module, Family):
    classifier_name, first_conv, default_input_size = "classifier", "feature.0", 32
    group_patterns = {"fine": dict(stem=r"^feature\.[01]\.", blocks=[(r"^feature\.(\d+)", None), (r"^hidden", (99999,))]),
                      "coarse": dict(stem=r"^feature\.[01]\.", blocks=[(r"^feature\.(\d+)", None), (r"^hidden", (99999,))])}

    """conv-BN-ReLU layers and max-pools as `cfg` says, global average pool, one linear layer.

    Args:
        cfg (list[int | str]): conv widths and "M" (max-pool), in order.
        num_classes (int): classifier outputs.
        in_chans (int): input image channels.
        drop_path_rate, layer_scale_init_value, head_init_scale: main.py passes these to every
            model; VGG has no drop path (only 0 is accepted) and no layer scale (ignored).
    """

    def __init__(self, cfg=None, num_classes=10, in_chans=3, hidden=(), drop_path_rate=0.,
                 layer_scale_init_value=None, head_init_scale=1., global_pool="avg", drop_rate=0.):
        super().__init__()
        if drop_path_rate:
            raise ValueError("VGG has no drop path: use --drop_path 0")
        cfg = [v if v == "M" else int(v) for v in (cfg or CONFIGS["vgg19_bn_cifar"])]
        layers, c = [], in_chans
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
                continue
            layers += [nn.Conv2d(c, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            c = v
        self.feature = nn.Sequential(*layers)
        hidden, fc = [int(h) for h in hidden], []
        for h in hidden:
            fc += [nn.Linear(c, h), nn.BatchNorm1d(h), nn.ReLU(inplace=True)]
            c = h
        self.hidden = nn.Sequential(*fc)
        self.classifier = nn.Linear(c, num_classes)
        self._init(head_init_scale)
        self.arch = {"family": "vgg_cifar", "cfg": cfg, "num_classes": num_classes, "in_chans": in_chans}
        if hidden:
            self.arch["hidden"] = hidden
        self._init_protocol(global_pool, drop_rate)

    def _init(self, head_init_scale):
        """The slimming seed's initialisation: BN scales start at 0.5."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                nn.init.constant_(m.weight, 0.5)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)
        self.classifier.weight.data.mul_(head_init_scale)

    def _segments(self):
        """[(first, stop)) ranges of `feature`: each level ends before a max-pool (the pool opens
        the next level; a trailing pool joins the last)."""
        pools = [i for i, m in enumerate(self.feature) if isinstance(m, nn.MaxPool2d)]
        starts = [0] + [p for p in pools if any(isinstance(m, nn.Conv2d) for m in self.feature[p:])]
        return list(zip(starts, starts[1:] + [len(self.feature)]))

    def _levels(self):
        """The convs between max-pools, as timm's VGG taps them (models/protocol.py)."""
        return [(f"feature.{b - 1}", [f"feature.{i}" for i in range(a, b)],
                 lambda x, a=a, b=b: self._run_range(a, b, x)) for a, b in self._segments()]

    def _run_range(self, a, b, x):
        for i in range(a, b):  # the installed modules themselves: torch.fx can trace them
            x = self.feature[i](x)
        return x

    def _level_info(self):
        info, reduction = [], 1
        for a, b in self._segments():
            reduction *= 2 ** sum(isinstance(m, nn.MaxPool2d) for m in self.feature[a:b])
            info.append(([m.out_channels for m in self.feature[a:b] if isinstance(m, nn.Conv2d)][-1], reduction))
        return info

    def _pre_logits(self, x):
        return self.hidden(x)

    head_key = "classifier"

    def fold(self):
        """Inference form: every BatchNorm folded into the conv before it (models/fold.py)."""
        layers = list(self.feature)
        for i, m in enumerate(layers):
            if isinstance(m, nn.BatchNorm2d):
                layers[i - 1], layers[i] = bn_into_conv(layers[i - 1], m), nn.Identity()
        self.feature = nn.Sequential(*layers)
        fc = list(self.hidden)
        for i in range(0, len(fc), 3):  # Linear, BatchNorm1d, ReLU
            fc[i], fc[i + 1] = bn_into_linear(fc[i], fc[i + 1]), nn.Identity()
        self.hidden = nn.Sequential(*fc)
        return self

    # --- arch <-> state dict <-> channel groups -------------------------------------------
    @classmethod
    def from_arch(cls, arch, **kwargs):
        return cls(cfg=arch["cfg"], num_classes=arch["num_classes"], in_chans=arch.get("in_chans", 3),
                   hidden=arch.get("hidden", ()), **kwargs)

    @staticmethod
    def describe(arch):
        return f"VGG-BN layers {arch['cfg']}" + (f", hidden {arch['hidden']}" if arch.get("hidden") else "")

    @staticmethod
    def widths(arch):
        return [("conv widths", ",".join(str(v) for v in arch["cfg"] if v != "M"))]

    @staticmethod
    def infer_arch(sd):
        """The arch of a state dict in this layout, or None when it is not one."""
        if "feature.0.weight" not in sd or "classifier.weight" not in sd:
            return None
        cfg, i = [], 0
        while f"feature.{i}.weight" in sd or f"feature.{i + 1}.weight" in sd:
            if f"feature.{i}.weight" in sd:  # conv at i, BN at i + 1, ReLU at i + 2
                cfg.append(sd[f"feature.{i}.weight"].shape[0])
                i += 3
            else:
                cfg.append("M")
                i += 1
        arch = {"family": "vgg_cifar", "cfg": cfg, "num_classes": sd["classifier.weight"].shape[0],
                "in_chans": sd["feature.0.weight"].shape[1]}
        hidden = [sd[f"hidden.{i}.weight"].shape[0] for i in range(0, 3 * len(sd), 3) if f"hidden.{i}.weight" in sd]
        if hidden:
            arch["hidden"] = hidden
        return arch

    @staticmethod
    def channel_groups(arch):
        """One group per conv: its output channels, named conv<block>_<n> (conv1_1, ...; a
        block ends at each max-pool). Cut: the conv's rows, its BatchNorm, the next conv's
        input columns (or the first hidden layer's, or the classifier's). The BN weights are
        the scale factors."""
        convs, block, n, index = [], 1, 0, 0
        for v in arch["cfg"]:
            if v == "M":
                block, n, index = block + 1, 0, index + 1
                continue
            n += 1
            convs.append((f"conv{block}_{n}", index, v, block - 1))
            index += 3
        groups = []
        for k, (name, i, width, stage) in enumerate(convs):
            consumer = (f"feature.{convs[k + 1][1]}.weight" if k + 1 < len(convs) else
                        "hidden.0.weight" if arch.get("hidden") else "classifier.weight")
            slices = ((Part(f"feature.{i}.weight", 0),)
                      + tuple(Part(f"feature.{i + 1}.{t}", 0) for t in BN_TENSORS)
                      + (Part(consumer, 1),))
            groups.append(Group(name, "conv", width, (Producer((Part(f"feature.{i}.weight", 0),)),),
                                slices, (f"feature.{i + 1}.weight",), stage=stage))
        return groups

    @staticmethod
    def example_arch():
        return {"family": "vgg_cifar", "cfg": [6, "M", 8, 5], "num_classes": 3, "in_chans": 3, "hidden": [4]}


register_family("vgg_cifar", VGGCifar)
for _name, _cfg in CONFIGS.items():
    register_factory(_name, VGGCifar, f"VGG-{_name[3:5]} with BatchNorm for 32 px images.",
                     cfg=_cfg, num_classes=10)
register_factory("vgg16_cifar", VGGCifar, "Li et al.'s CIFAR VGG-16 (Pruning Filters): BN convs, a 512-unit "
                 "hidden layer, then the classifier.", cfg=CONFIGS["vgg16_bn_cifar"], hidden=[512], num_classes=10)

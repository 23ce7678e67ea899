"""timm's model protocol, shared by every family: what `timm.create_model` users call on a
model (forward_features / forward_head, get_classifier / reset_classifier, global_pool,
feature_info and forward_intermediates for features_only, grad checkpointing, group_matcher,
pretrained_cfg), so importing this toolkit changes nothing a timm user relies on.

A family describes itself with a few hooks; the mixin does the rest:
- `_levels()`: one entry per feature level, in forward order: (feature module name, attribute
  paths it owns, run(x)); feature_info comes from `_level_info()` (num_chs, reduction).
- `_final(x)`: what follows the last level before pooling (a pre-activation net's last norm).
- `_pre_logits(x)`: from pooled (N, C) features to what the classifier reads (a LayerNorm, a
  hidden MLP); applied at every position when global_pool is ''.
- class attributes `classifier_name`, `first_conv`, `default_input_size`, `group_patterns`.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# timm's IMAGENET_DEFAULT_MEAN / STD, written out: models/ builds without importing timm
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
POOLS = {"avg": lambda x: x.mean((-2, -1)), "max": lambda x: x.amax((-2, -1)),
         "avgmax": lambda x: 0.5 * (x.mean((-2, -1)) + x.amax((-2, -1))), "": None}


def take_indices(n, indices):
    """(sorted level indices to return, the largest): None -> all, int k -> the last k, a
    sequence -> those (negative ones count from the end)."""
    if indices is None:
        indices = n
    if isinstance(indices, int):
        if not 0 < indices <= n:
            raise ValueError(f"indices: take 1 to {n} of the last levels, not {indices}")
        take = list(range(n - indices, n))
    else:
        take = sorted({i % n if -n <= i < n else _out_of_range(i, n) for i in indices})
    return take, max(take)


def _out_of_range(i, n):
    raise ValueError(f"feature level {i} does not exist: this model has {n} (0 to {n - 1})")


def _checked_pool(global_pool):
    if global_pool not in POOLS:
        raise ValueError(f"global_pool must be one of {', '.join(map(repr, POOLS))}, not {global_pool!r}")
    return global_pool


def _pointwise(fn, x):
    """fn over the channels of every position of an N x C x H x W map."""
    n, _, h, w = x.shape
    y = fn(x.permute(0, 2, 3, 1).reshape(n * h * w, -1))
    return y.reshape(n, h, w, -1).permute(0, 3, 1, 2)


class TimmProtocol:
    """The mixin (see the module doc); call `_init_protocol(global_pool, drop_rate)` at the end
    of __init__ (drop_rate: dropout before the classifier, as timm's models take it)."""
    classifier_name = "head"
    first_conv = ""
    default_input_size = 224
    group_patterns = {}

    def _init_protocol(self, global_pool="avg", drop_rate=0.):
        if not 0 <= drop_rate < 1:
            raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}")
        self.global_pool, self.drop_rate = _checked_pool(global_pool), float(drop_rate)
        self.grad_checkpointing = False
        levels = self._levels()
        self._depth = len(levels)
        self._final_on = True
        self.feature_info = [dict(num_chs=c, reduction=r, module=name)
                             for (name, _, _), (c, r) in zip(levels, self._level_info())]
        self.num_features = self.feature_info[-1]["num_chs"]
        classifier = self.get_classifier()
        if isinstance(classifier, nn.Linear) and classifier.out_features == 0:  # timm's num_classes=0
            setattr(self, self.classifier_name, nn.Identity())
        self.head_hidden_size = classifier.in_features if isinstance(classifier, nn.Linear) else self.num_features
        self.pretrained_cfg = self.default_cfg = self._default_cfg()

    # --- what a family may override ---------------------------------------------------------

    def _final(self, x):
        return x

    def _stage_levels(self, stem, names):
        """Levels of a CIFAR-style net: `stem` (name, paths, run), then each named stage module."""
        return [stem] + [(n, [n], self.get_submodule(n)) for n in names]

    def _pre_logits(self, x):
        return x

    def _default_cfg(self):
        size = self.default_input_size
        red = self.feature_info[-1]["reduction"]
        return {"url": "", "num_classes": self.num_classes, "input_size": (self.arch.get("in_chans", 3), size, size),
                "pool_size": (max(size // red, 1),) * 2, "crop_pct": 0.875, "interpolation": "bicubic",
                "fixed_input_size": False, "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
                "first_conv": self.first_conv, "classifier": self.classifier_name, "architecture": None}

    # --- the protocol ---------------------------------------------------------------------

    @property
    def num_classes(self):
        return self.arch["num_classes"]

    def _run(self, run, x):
        if self.grad_checkpointing and self.training and not torch.jit.is_scripting():
            return checkpoint(run, x, use_reentrant=False)
        return run(x)

    def forward_features(self, x):
        """The last level's map, unpooled (N x num_features x H x W)."""
        for _, _, run in self._levels()[:self._depth]:  # built once per forward, not per level
            x = self._run(run, x)
        return self._final(x) if self._final_on else x

    def forward_head(self, x, pre_logits=False):
        """Pool (global_pool), then what the classifier reads; its logits unless pre_logits.
        With global_pool '' the head runs at every position (N x classes x H x W)."""
        pool = POOLS[self.global_pool]
        if pool is None:
            return _pointwise(lambda v: self._logits(self._pre_logits(v), pre_logits), x)
        return self._logits(self._pre_logits(pool(x)), pre_logits)

    def _logits(self, x, pre_logits):
        if pre_logits:
            return x
        return self.get_classifier()(F.dropout(x, self.drop_rate, self.training) if self.drop_rate else x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))

    def get_classifier(self):
        return getattr(self, self.classifier_name)

    def reset_classifier(self, num_classes, global_pool=None):
        """A fresh classifier of num_classes outputs (0: none, the model returns its features)."""
        if global_pool is not None:
            self.global_pool = _checked_pool(global_pool)
        old = self.get_classifier()
        kw = {"device": old.weight.device, "dtype": old.weight.dtype} if isinstance(old, nn.Linear) else {}
        new = nn.Linear(self.head_hidden_size, num_classes, **kw) if num_classes > 0 else nn.Identity()
        setattr(self, self.classifier_name, new)
        self.arch = {**self.arch, "num_classes": num_classes}
        self.pretrained_cfg = self.default_cfg = {**self.pretrained_cfg, "num_classes": num_classes}

    def forward_intermediates(self, x, indices=None, norm=False, stop_early=False, output_fmt="NCHW",
                              intermediates_only=False):
        """Every level's output (or those `indices` picks, see take_indices) and, unless
        intermediates_only, the final features forward_head takes."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', not {output_fmt!r}")
        take, last = take_indices(self._depth, indices)
        feats = []
        stop = last + 1 if stop_early or intermediates_only else self._depth
        for i, (_, _, run) in enumerate(self._levels()[:stop]):
            x = self._run(run, x)
            if i in take:
                feats.append(self._final(x) if norm and i == self._depth - 1 and self._final_on else x)
        if intermediates_only:
            return feats
        return (self._final(x) if self._final_on and stop == self._depth else x), feats

    def prune_intermediate_layers(self, indices=1, prune_norm=False, prune_head=True):
        """Drop the levels after the last one `indices` asks for (and the head, the final norm):
        what features_only keeps. Returns the level indices kept."""
        take, last = take_indices(self._depth, indices)
        for name, paths, _ in self._levels()[last + 1:]:
            for path in paths:
                parent, _, attr = path.rpartition(".")
                setattr(self.get_submodule(parent) if parent else self, attr, nn.Identity())
        truncated = last + 1 < self._depth
        self._depth = last + 1
        if prune_norm or truncated:
            self._final_on = False
        if truncated:
            self.num_features = self.head_hidden_size = self.feature_info[last]["num_chs"]
        if prune_head or truncated:
            self.reset_classifier(0, "")
        return take

    def set_grad_checkpointing(self, enable=True):
        self.grad_checkpointing = enable

    def group_matcher(self, coarse=False):
        """Parameter groups by name (timm's layer-wise LR decay and optimizer factory)."""
        return self.group_patterns["coarse" if coarse else "fine"]

    def no_weight_decay(self):
        return set()

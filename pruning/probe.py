"""Looking inside a dense model and its pruned copy side by side: the normalisation layers in
forward order, the channels each one keeps, and the input each one sees on real images.

What compensate.py (the remedy) and diagnosis.py (the evidence for it) both read.
"""
from dataclasses import replace

import torch
import torch.nn as nn

from models.groups import part_span
from models.layers import LayerNorm2d

from .surgery import cut_positions

NORMS = (nn.LayerNorm, nn.BatchNorm1d, nn.BatchNorm2d)


class _Stop(Exception):
    """Raised by a hook once the tensor asked for is captured: the rest of the forward is skipped."""


def _forward(model, images, handles):
    """One forward without gradients (stopped early by a hook raising _Stop), then the hooks removed."""
    try:
        with torch.no_grad():
            model(images)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()


def norm_order(model, images):
    """Names of the model's LayerNorm / BatchNorm modules in the order a forward calls them."""
    order, handles = [], []
    for name, module in model.named_modules():
        if isinstance(module, NORMS):
            handles.append(module.register_forward_pre_hook(lambda m, i, name=name: order.append(name)))
    _forward(model, images[:1], handles)
    return list(dict.fromkeys(order))


def channel_axis(module):
    """The axis of a norm's input that holds the channels: LayerNorm's last (our LayerNorm2d's
    and BatchNorm's 1)."""
    return -1 if isinstance(module, nn.LayerNorm) and not isinstance(module, LayerNorm2d) else 1


def channels_last(module, x):
    """A norm's input as (tokens, channels) in float64."""
    x = x.movedim(channel_axis(module), -1)
    return x.reshape(-1, x.shape[-1]).double()


def capture(model, name, images):
    """The input of module `name` for these images (the forward stops there)."""
    module = model.get_submodule(name)
    seen = {}

    def hook(mod, inputs):
        seen["x"] = inputs[0].detach()
        raise _Stop

    _forward(model, images, [module.register_forward_pre_hook(hook)])
    return seen["x"]


def capture_all(model, names, images):
    """{name: the input of that module} from one forward."""
    seen, handles = {}, []
    for name in names:
        handles.append(model.get_submodule(name).register_forward_pre_hook(
            lambda m, i, name=name: seen.__setitem__(name, i[0].detach())))
    _forward(model, images, handles)
    return seen


class FixedInputs:
    """The inputs of some modules of a model that does not change, per image batch: kept in
    memory from one forward per batch when they fit in `budget` bytes, else captured again
    on each request."""

    def __init__(self, model, names, images, budget=1 << 29):
        self.model, self.images = model, images
        first = capture_all(model, names, images[0])
        size = sum(t.numel() * t.element_size() for t in first.values()) * len(images)
        self.kept = [first] + [capture_all(model, names, x) for x in images[1:]] if size <= budget else None

    def get(self, name, i):
        return self.kept[i][name] if self.kept is not None else capture(self.model, name, self.images[i])


def consumers(model, images, names):
    """{norm name: the Linear / dense Conv2d that takes its output as it is} (a block norm ->
    pwconv1, a downsampling norm -> its conv, the final norm -> head); norms whose output
    goes elsewhere (into a residual stream, a depthwise conv) are absent."""
    outputs, found, handles = {}, {}, []
    for name in names:  # the outputs stay referenced, so no other tensor can reuse their id
        handles.append(model.get_submodule(name).register_forward_hook(
            lambda m, i, out, name=name: outputs.__setitem__(id(out), (name, out))))
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1):
            def pre(mod, inputs, name=name):
                norm = outputs.get(id(inputs[0]))
                if norm is not None and norm[1] is inputs[0]:
                    found.setdefault(norm[0], name)
            handles.append(module.register_forward_pre_hook(pre))
    _forward(model, images[:1], handles)
    return found


def kept_channels(groups, keep, key, axis=0):
    """The kept positions of tensor `key` on `axis` (None: no group cuts it)."""
    holders = [(g, p) for g in groups for p in g.slices if p.key == key and p.axis == axis]
    if not holders:
        return None
    size = max(part_span(p, g.width) for g, p in holders)
    own = [replace(g, slices=(p,)) for g, p in holders]
    return cut_positions({key: (1,) * axis + (size,)}, own, keep).get((key, axis), torch.arange(size))


def stage_of(groups, key):
    """The stage of the group that cuts tensor `key` (None when no group does)."""
    return next((g.stage for g in groups if any(p.key == key for p in g.slices)), None)

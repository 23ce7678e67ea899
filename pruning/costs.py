"""A fast cost model for candidate prunings (the exact counts are models.count_arch).

`CostModel` answers "what would params and MACs be if these channels were kept?" many times
during a global ranking without rebuilding a model each time. Every counted op of these
families is a conv or a Linear, whose MACs are numel(weight) x output positions, and the
positions depend on the input size only, never on channel widths. So the model records each
weight's output positions once (forward hooks on the meta model), and a candidate's cost is a
sum over tensors of their pruned sizes. It checks itself against FlopCounterMode on the
unpruned shape and refuses to run if they disagree.
"""
import copy

import torch
import torch.nn as nn

from models import meta_model
from models.complexity import count_macs, count_params


def owned_by_any(key, blocks):
    """Whether a tensor key belongs to one of the named blocks."""
    return any(key.startswith(name + ".") for name in blocks)


class KeptShapes:
    """The shape each tensor takes when group `name` keeps indices keep[name].

    Args:
        shapes: dict key -> source shape (the tensors to follow).
        groups: channel groups whose slices cut them.
    """

    def __init__(self, shapes, groups):
        self.shapes = dict(shapes)
        self.cuts = {k: [] for k in self.shapes}  # key -> [(axis, group, start, stop, block)]
        for g in groups:
            for part in g.slices:
                if part.key in self.cuts:
                    stop = g.width if part.stop is None else part.stop
                    self.cuts[part.key].append((part.axis, g.name, part.start, stop, part.block))

    def __call__(self, keep):
        """dict key -> list shape (absent groups keep every channel).

        Args:
            keep: dict group name -> sorted kept indices (list or 1-D tensor).
        """
        counts, out = {}, {}  # counts: (group, start, stop) -> kept channels in that range
        for key, shape in self.shapes.items():
            size = list(shape)
            for axis, group, start, stop, block in self.cuts[key]:
                if group in keep:
                    rng = (group, start, stop)
                    if rng not in counts:
                        idx = torch.as_tensor(keep[group])
                        counts[rng] = int(((idx >= start) & (idx < stop)).sum())
                    size[axis] -= (stop - start - counts[rng]) * block
            out[key] = size
        return out


class CostModel:
    """Params and MACs of candidate kept-index sets for the channel groups of one arch.

    Args:
        arch: the source shape.
        groups: models.channel_groups(arch).
        input_size: image side in pixels for MACs.
    """

    def __init__(self, arch, groups, input_size):
        self.removed = ()  # blocks counted as gone (depth pruning; see `without`)
        model = meta_model(arch).eval()
        self.widths = {g.name: g.width for g in groups}
        self.positions = self._weight_positions(model, arch, input_size)
        self.kept_shapes = KeptShapes({k: tuple(p.shape) for k, p in model.named_parameters()}, groups)
        self.full = count_params(model), count_macs(model, input_size)
        mine = self({})
        if mine != self.full:
            raise RuntimeError(f"cost model disagrees with FlopCounterMode on {arch.get('family')}: "
                               f"{mine} vs {self.full} (params, MACs)")

    @staticmethod
    def _weight_positions(model, arch, input_size):
        """Output positions per conv/Linear weight key (MACs per weight element)."""
        positions, hooks = {}, []

        def hook_for(name, out_features):
            def hook(module, inputs, output):
                positions[f"{name}.weight"] = output.numel() // out_features
            return hook

        for name, module in model.named_modules():
            if isinstance(module, nn.Conv2d):
                hooks.append(module.register_forward_hook(hook_for(name, module.out_channels)))
            elif isinstance(module, nn.Linear):
                hooks.append(module.register_forward_hook(hook_for(name, module.out_features)))
        x = torch.empty(1, arch.get("in_chans", 3), input_size, input_size, device="meta")
        with torch.no_grad():
            model(x)
        for h in hooks:
            h.remove()
        return positions

    def without(self, removed):
        """This model with the blocks named in `removed` counted as gone."""
        view = copy.copy(self)
        view.removed = tuple(removed)
        return view

    def __call__(self, keep):
        """(params, MACs) when group `name` keeps indices keep[name] (all for absent names).

        Args:
            keep: dict group name -> sorted kept indices (list or 1-D tensor).
        """
        params = macs = 0
        for key, size in self.kept_shapes(keep).items():
            if owned_by_any(key, self.removed):
                continue
            n = 1
            for s in size:
                n *= s
            params += n
            macs += n * self.positions.get(key, 0)
        return params, macs

"""State dicts across key layouts: renaming by name templates (a family's names <-> timm's)
and the finite-values check every reader applies."""
import collections
import re

import torch


def _template_regex(template):
    """'stages.{s}.{j}.norm' -> a regex matching it as a key prefix, capturing s and j."""
    pattern = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>\\d+)", re.escape(template))
    return re.compile(rf"^{pattern}(?=\.|$)")


def rename_keys(state, pairs, reverse=False):
    """Rename a state dict's keys by (ours, theirs) template pairs, first match wins; with
    `reverse`, theirs -> ours. Returns (renamed dict, keys no template matched)."""
    compiled = [(_template_regex(b if reverse else a), a if reverse else b) for a, b in pairs]
    out, unmatched = {}, []
    for key, value in state.items():
        for regex, target in compiled:
            m = regex.match(key)
            if m:
                out[target.format(**m.groupdict()) + key[m.end():]] = value
                break
        else:
            unmatched.append(key)
    return out, unmatched


def nonfinite_keys(state):
    """Keys of floating-point tensors holding NaN or infinite values (a diverged run)."""
    return [k for k, v in state.items()
            if isinstance(v, torch.Tensor) and v.is_floating_point() and v.device.type != "meta"
            and not bool(torch.isfinite(v).all())]


def with_own_metadata(model, state):
    """`state` carrying the model's own per-module versions where it has none (a state dict
    read from a file or copied loses them; torchvision's MNASNet refuses to load without)."""
    if getattr(state, "_metadata", None) is not None:
        return state
    out = collections.OrderedDict(state)  # a plain dict takes no attributes
    out._metadata = getattr(model.state_dict(), "_metadata", None)
    return out

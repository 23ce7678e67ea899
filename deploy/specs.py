"""The models a benchmark times, named on its command line: a registered name, a checkpoint
path, or `timm_convnext:<our name>` (timm's own ConvNeXt class in our shape, for --vs)."""
import os

import torch

import models
from checkpoints.identity import load_held_model
from common.errors import UserError


def build(spec):
    """A model from a registered name, `timm_convnext:<our name>` or a checkpoint path."""
    torch.manual_seed(0)  # both sides of a --vs comparison start from the same weights
    if spec.startswith("timm_convnext:"):
        return timm_convnext_like(spec.split(":", 1)[1])
    if os.path.exists(spec) or spec.endswith((".pth", ".pt")):
        return from_checkpoint(spec)
    return models.create_model(spec)


def timm_convnext_like(name):
    """timm's `ConvNeXt` class with the depths, dims, classes and layer scale of our `name`."""
    from timm.models.convnext import ConvNeXt as TimmConvNeXt
    ours = models.create_model(name)
    arch = getattr(ours, "arch", None) or {}
    if arch.get("family") != "convnext" or arch.get("dw", "standard") != "standard":
        raise UserError(f"timm_convnext:{name}: timm's ConvNeXt only mirrors our standard "
                        f"ConvNeXt family, not {arch.get('family') or type(ours).__name__}")
    if any(h != 4 * d for stage, d in zip(arch["hidden"], arch["dims"]) for h in stage):
        raise UserError(f"timm_convnext:{name}: timm's ConvNeXt has no per-block MLP widths "
                        f"(this model's hidden widths are pruned)")
    gammas = [p for n, p in ours.named_parameters() if n.endswith("gamma")]
    ls_init = float(gammas[0].detach().flatten()[0]) if gammas else None  # None: no layer scale
    return TimmConvNeXt(in_chans=arch["in_chans"], num_classes=arch["num_classes"],
                        depths=arch["depths"], dims=arch["dims"], ls_init_value=ls_init)


def from_checkpoint(path):
    """Rebuild a checkpoint's exact shape from its `arch` (or its tensors) and load its weights."""
    return load_held_model(path)[0]


# --- measuring ----------------------------------------------------------------------------

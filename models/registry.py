"""One registry: our factories live in timm's, and each family rebuilds from its `arch`."""
import functools
import warnings

import timm
import torch
from timm.models import register_model

from utils import UserError

FAMILIES = {}  # arch["family"] -> model class
OUR_MODELS = {}  # registered name -> (class, default kwargs)
# timm's create_model passes these to every factory; our models have no hub weights.
TIMM_ONLY_KWARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")
# Our constructors' own options, which stock timm models do not take.
OURS_ONLY_KWARGS = ("layer_scale_init_value", "head_init_scale")


def register_family(name, cls):
    FAMILIES[name] = cls


def register_factory(name, cls, doc, **defaults):
    """Register `name` in timm's registry (quietly: some names replace timm's own)."""

    def factory(pretrained=False, **kwargs):
        for key in TIMM_ONLY_KWARGS:
            kwargs.pop(key, None)
        if pretrained:
            raise UserError(f"{name}: weights cannot be downloaded here; "
                            "load a local checkpoint with --finetune or --resume")
        return cls(**{**defaults, **kwargs})

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = doc
    factory.__module__ = cls.__module__
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        register_model(factory)
    OUR_MODELS[name] = (cls, defaults)
    return factory


def create_model(name, **kwargs):
    """Build a registered model by name: ours, or any stock timm model."""
    if name not in OUR_MODELS:
        if not timm.is_model(name):
            raise UserError(f"unknown model {name!r}: not one of ours (see README's model zoo) "
                            "nor a timm model name")
        for key in OURS_ONLY_KWARGS:
            kwargs.pop(key, None)
    return timm.create_model(name, **kwargs)


@functools.cache
def default_arch(name):
    """The arch a registered factory builds, computed without allocating weights."""
    cls, defaults = OUR_MODELS[name]
    with torch.device("meta"):
        return cls(**defaults).arch

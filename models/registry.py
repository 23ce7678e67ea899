"""One registry: our factories live in timm's, and each family rebuilds from its `arch`."""
import functools
import warnings

import timm
import torch
from timm.models import register_model

from errors import UserError

from .family import Family

FAMILIES = {}  # arch["family"] -> model class
OUR_MODELS = {}  # registered name -> (class, default kwargs)
# timm's create_model passes these to every factory; our models have no hub weights.
TIMM_ONLY_KWARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")
# Classifier weights of stock timm models (ours: each family's `head_key`).
TIMM_HEAD_KEYS = ("head.fc.weight", "fc.weight", "classifier.weight", "head.weight")
# Our constructors' own options, which stock timm models do not take.
OURS_ONLY_KWARGS = ("layer_scale_init_value", "head_init_scale")


def register_family(name, cls):
    """Register a model class under its arch["family"] name; it must keep the whole contract."""
    missing = sorted(getattr(cls, "__abstractmethods__", ())) if issubclass(cls, Family) else ["Family"]
    if missing:
        raise TypeError(f"model family {name} does not implement {', '.join(missing)} of models.family.Family")
    FAMILIES[name] = cls


def register_factory(name, cls, doc, **defaults):
    """Register `name` in timm's registry (quietly: some names replace timm's own)."""

    def factory(pretrained=False, **kwargs):
        for key in TIMM_ONLY_KWARGS:
            kwargs.pop(key, None)
        if pretrained:
            raise UserError(f"{name}: weights cannot be downloaded here; "
                            "load a local checkpoint with --finetune or --resume")
        try:
            return cls(**{**defaults, **kwargs})
        except ValueError as e:  # an option the family does not have (e.g. drop path in VGG)
            raise UserError(f"{name}: {e}") from None

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = doc
    factory.__module__ = cls.__module__
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        register_model(factory)
    OUR_MODELS[name] = (cls, defaults)
    return factory


def check_model_name(name):
    """Refuse a name that is neither one of ours nor a timm model (e.g. a typo)."""
    if name not in OUR_MODELS and not timm.is_model(name):
        close = [n for n in OUR_MODELS if n.startswith(name.split("_")[0])][:4]
        hint = f" (ours include {', '.join(close)})" if close else " (see the README's model zoo)"
        raise UserError(f"unknown model {name!r}: not one of ours nor a timm model name{hint}")


def create_model(name, **kwargs):
    """Build a registered model by name: ours, or any stock timm model."""
    check_model_name(name)
    if name not in OUR_MODELS:
        for key in OURS_ONLY_KWARGS:
            kwargs.pop(key, None)
    return timm.create_model(name, **kwargs)


@functools.cache
def default_arch(name):
    """The arch a registered factory builds, computed without allocating weights."""
    cls, defaults = OUR_MODELS[name]
    with torch.device("meta"):
        return cls(**defaults).arch

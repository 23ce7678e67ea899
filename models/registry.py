"""One registry: our factories live in timm's, and each family rebuilds from its `arch`.

timm is imported only where it is needed (a stock timm name, a pretrained tag, a Hub folder,
training): our names build without it, so pruning and evaluation start without timm's
import cost. Our factories enter timm's registry the moment timm is imported, by anyone
(`_AfterTimm`), so `import models; timm.create_model("convnext_tiny_13M_pruned_cifar10")`
works as it always has.
"""
import functools
import importlib.abc
import importlib.machinery
import os
import sys
import warnings

import torch

from common.errors import UserError, first_line

from .family import Family
from .weights import nonfinite_keys

FAMILIES = {}  # arch["family"] -> model class
OUR_MODELS = {}  # registered name -> (class, default kwargs)
ARCH_FACTORY = "efficient_convnext_arch"  # builds any family's `arch` (timm-layout export folders)
# Classifier weights of stock timm models (ours: each family's `head_key`).
TIMM_HEAD_KEYS = ("head.fc.weight", "fc.weight", "classifier.weight", "head.weight")
# timm's feature-extraction options (features_only=True: timm's builder wraps the model)
FEATURE_KWARGS = ("features_only", "out_indices", "feature_cls")
# Our constructors' own options, which stock timm models do not take.
OURS_ONLY_KWARGS = ("layer_scale_init_value", "head_init_scale")


def register_family(name, cls):
    """Register a model class under its arch["family"] name; it must keep the whole contract."""
    missing = sorted(getattr(cls, "__abstractmethods__", ())) if issubclass(cls, Family) else ["Family"]
    if missing:
        raise TypeError(f"model family {name} does not implement {', '.join(missing)} of models.family.Family")
    FAMILIES[name] = cls


def our_layout(state_dict):
    """A state dict in another layout a family reads (timm's ConvNeXt) renamed into ours, else
    as it is."""
    for family in FAMILIES.values():
        converted = family.from_foreign(state_dict)
        if converted is not None:
            return converted
    return state_dict


_FACTORIES = {}  # registered name -> its factory (what timm's registry calls)
_PENDING = []  # factories not yet in timm's registry


def _timm():
    """timm, imported (our factories then enter its registry: _AfterTimm)."""
    import timm
    _register_pending()
    return timm


def _register_pending():
    if not _PENDING:
        return
    from timm.models import register_model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quietly: some names replace timm's own
        while _PENDING:
            factory = _PENDING.pop(0)
            mod = sys.modules[factory.__module__]
            if hasattr(mod, "timm_default_cfgs") and not hasattr(mod, "default_cfgs"):
                mod.default_cfgs = mod.timm_default_cfgs()  # timm's registry reads it when a name registers
            register_model(factory)


class _AfterTimm(importlib.abc.MetaPathFinder):
    """Registers our factories right after `import timm` completes, whoever imports it.

    It stays on sys.meta_path until timm is really imported: a probe such as
    importlib.util.find_spec("timm") (transformers, accelerate and lightning run those at
    import time) only gets a spec, and the import that follows still passes through here."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "timm":
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)  # not via meta_path: no recursion
        if spec is None or spec.loader is None:
            return None
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            _register_pending()
        spec.loader.exec_module = exec_module
        return spec


def _factory(name, build, doc, module, head_key):
    """The factory of `name`: `build(**kwargs)`, or with pretrained weights (pretrained=True, a
    tag such as `.fb_in22k`, pretrained_cfg_overlay=dict(file=...), a local-dir: / hf-hub:
    folder) through timm's own machinery, renamed into our layout; `head_key` is the
    classifier (None: as the folder's config says). timm is imported only for weights."""

    def factory(pretrained=False, pretrained_cfg=None, pretrained_cfg_overlay=None, cache_dir=None,
                pretrained_model_args=None, **kwargs):  # timm passes pretrained_model_args; unused
        try:
            features = {k: kwargs.pop(k) for k in FEATURE_KWARGS if k in kwargs}
            if not (pretrained or pretrained_cfg or pretrained_cfg_overlay or features.get("features_only")):
                return build(**kwargs)
            return _through_timm(name, build, head_key, pretrained, pretrained_cfg, pretrained_cfg_overlay,
                                 cache_dir, kwargs, features)
        except ValueError as e:  # an option the family does not have (e.g. drop path in VGG)
            raise UserError(f"{name}: {e}") from None

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = doc
    factory.__module__ = module
    return factory


def _through_timm(name, build, head_key, pretrained, pretrained_cfg, overlay, cache_dir, kwargs, features):
    """timm's builder: pretrained weights (renamed into our layout, checked) and / or
    features_only (timm's FeatureGetterNet over our forward_intermediates, every level by
    default; out_indices picks some)."""
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError
    from timm.models import build_model_with_cfg
    with torch.device("meta"):
        probe = build(**kwargs)  # the shape's own cfg and feature levels, no memory
    feature_cfg = None
    if features.get("features_only"):
        kwargs["features_only"] = True
        feature_cfg = dict(feature_cls=features.get("feature_cls", "getter"),
                           out_indices=features.get("out_indices", tuple(range(len(probe.feature_info)))))
    try:
        weights = pretrained or pretrained_cfg or overlay
        cfg = probe.pretrained_cfg
        if weights:  # a tag's cfg names timm's modules: ours follow the official key layout
            cfg = {**_resolve_cfg(name, pretrained, pretrained_cfg, overlay, head_key).to_dict(),
                   "first_conv": probe.first_conv}
        return build_model_with_cfg(build, name, pretrained, pretrained_cfg=cfg, feature_cfg=feature_cfg,
                                    pretrained_filter_fn=_pretrained_filter(name), cache_dir=cache_dir, **kwargs)
    except (OSError, HfHubHTTPError, EntryNotFoundError) as e:  # the download, or the cache
        raise UserError(f"{name}: cannot fetch its pretrained weights ({first_line(e)})") from None


def _resolve_cfg(name, pretrained, pretrained_cfg, overlay, head_key):
    """timm's pretrained cfg for `name` (a tag, a dict, an overlay), refused in one line where
    it names no weights to load."""
    from timm.models import get_pretrained_cfg, resolve_pretrained_cfg
    if pretrained and not (pretrained_cfg or overlay or get_pretrained_cfg(name)):
        raise UserError(f"{name}: timm has no pretrained weights for it; start from a checkpoint "
                        "with --finetune, or give pretrained_cfg_overlay=dict(file=...)")
    overlay = {**({"classifier": head_key} if head_key else {}), **(overlay or {})}
    cfg = resolve_pretrained_cfg(name, pretrained_cfg=pretrained_cfg, pretrained_cfg_overlay=overlay)
    if pretrained and not (cfg.has_weights or cfg.source == "local-dir"):
        raise UserError(f"{name}: its pretrained config names no weights (no file, url or hf_hub_id)")
    if pretrained and cfg.file and cfg.source != "local-dir" and not os.path.isfile(cfg.file):
        raise UserError(f"{name}: pretrained file {cfg.file} not found")
    return cfg


def head_prefix(model):
    """Key prefix of the classifier: timm's get_classifier() where it exists, else the
    family's head_key, else `head.`."""
    arch = getattr(model, "arch", None)
    if isinstance(arch, dict) and arch.get("family") == "traced" and arch.get("head"):
        return arch["head"].rpartition(".")[0] + "."  # the trace found it (torchvision has no get_classifier)
    get = getattr(model, "get_classifier", None)
    head = get() if callable(get) else None
    name = next((n for n, m in model.named_modules() if m is head), None) if head is not None else None
    return f"{name}." if name else f"{getattr(type(model), 'head_key', 'head')}."


def with_own_head(model, state_dict, log=None):
    """`state_dict` with the model's own (fresh) head wherever the checkpoint's head has another
    shape or is missing: the one head-drop rule (fine-tuning to other classes, timm's weights
    under a new head). log(key, old shape, new shape) hears of each tensor replaced."""
    own, state = model.state_dict(), dict(state_dict)
    for k in [k for k in own if k.startswith(head_prefix(model))]:
        if k not in state or state[k].shape != own[k].shape:
            if log is not None:
                log(k, list(state[k].shape) if k in state else "absent", list(own[k].shape))
            state[k] = own[k]
    return state


def _pretrained_filter(name):
    """timm's weights -> ours, checked: finite, and every tensor fitting the model except a
    head of another class count, which the model keeps fresh (timm's head reset)."""
    def convert(state_dict, model):
        from . import check_arch_matches  # the package imports this module first
        state = our_layout(state_dict)
        bad = nonfinite_keys(state)
        if bad:
            raise UserError(f"{name}: the pretrained weights hold NaN or infinite values (e.g. {bad[0]})")
        state = with_own_head(model, state)
        check_arch_matches(model, state, f"the pretrained weights of {name}", name)
        return state
    return convert


def register_factory(name, cls, doc, **defaults):
    """Register `name` for `cls` with default kwargs (in timm's registry once timm is imported)."""
    _register_later(name, lambda **kwargs: cls(**{**defaults, **kwargs}), doc, cls.__module__, cls.head_key)
    OUR_MODELS[name] = (cls, defaults)


def _register_later(name, *entry):
    _FACTORIES[name] = _factory(name, *entry)
    _PENDING.append(_FACTORIES[name])
    if "timm.models" in sys.modules and hasattr(sys.modules["timm.models"], "register_model"):
        _register_pending()  # timm was imported before us


def _from_arch(arch=None, **kwargs):
    """Any family's `arch` (num_classes / in_chans given replace the arch's)."""
    family = FAMILIES.get(arch.get("family")) if isinstance(arch, dict) else None
    if family is None:
        raise UserError(f"{ARCH_FACTORY} needs arch=dict(family=..., ...) of one of: {', '.join(FAMILIES)}")
    arch = {**arch, **{k: kwargs.pop(k) for k in ("num_classes", "in_chans") if k in kwargs}}
    return family.from_arch(arch, **kwargs)


def base_name(name):
    """A model name without its pretrained tag (`convnext_tiny.fb_in22k` -> `convnext_tiny`)."""
    return name.split(".", 1)[0]


def is_tagged(name):
    """A name with a pretrained tag (`convnext_tiny.fb_in22k`): it starts from timm's weights."""
    return base_name(name) != name


def pretrained_classes(name):
    """The class count of timm's pretrained weights for a tagged name, or None."""
    cfg = _timm().models.get_pretrained_cfg(name)
    return cfg.num_classes if cfg is not None else None


def is_stock_timm(name):
    """A timm model name (a tag allowed) that is not one of ours."""
    return base_name(name) not in OUR_MODELS and base_name(name) != ARCH_FACTORY and _timm().is_model(name)


def check_model_name(name):
    """Refuse a name that is neither one of ours nor a timm model (e.g. a typo), or a
    pretrained tag timm does not have."""
    if name in OUR_MODELS:
        return
    timm = _timm()
    if base_name(name) not in OUR_MODELS and not timm.is_model(name):
        close = [n for n in OUR_MODELS if n.startswith(name.split("_")[0])][:4]
        hint = f" (ours include {', '.join(close)})" if close else " (see docs/models.md's model zoo)"
        raise UserError(f"unknown model {name!r}: not one of ours nor a timm model name{hint}")
    if "." in name:
        try:
            timm.models.get_pretrained_cfg(name)
        except RuntimeError:
            tags = timm.list_pretrained(f"{base_name(name)}.*")
            raise UserError(f"unknown pretrained tag in {name!r}; timm has "
                            + (", ".join(tags[:6]) + (", ..." if len(tags) > 6 else "") if tags else "none")) from None


def create_model(name, **kwargs):
    """Build a registered model by name: ours (a pretrained tag allowed), or any stock timm model."""
    check_model_name(name)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}  # as timm.create_model does
    if name in OUR_MODELS and not any(kwargs.get(k) for k in ("pretrained", "pretrained_cfg",
                                                              "pretrained_cfg_overlay")):
        return _FACTORIES[name](**kwargs)  # no weights to fetch: no timm
    if is_stock_timm(name):
        for key in OURS_ONLY_KWARGS:
            kwargs.pop(key, None)
    return _timm().create_model(name, **kwargs)



@functools.cache
def default_arch(name):
    """The arch a registered factory builds, computed without allocating weights."""
    cls, defaults = OUR_MODELS[name]
    with torch.device("meta"):
        return cls(**defaults).arch


_register_later(ARCH_FACTORY, _from_arch, "Any shape of this toolkit's families, from its `arch` dict.",
                __name__, None)
if "timm" not in sys.modules:
    sys.meta_path.insert(0, _AfterTimm())

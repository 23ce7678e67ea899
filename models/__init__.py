"""Model families. Importing this package registers every factory (in timm's registry once timm is
imported: registry.py)."""
import functools
import json

import torch

from common.errors import UserError

from . import convnext, convnext_isotropic, preresnet_cifar, resnet_cifar, vgg_cifar, wrn_cifar  # noqa: F401  (registers the families)
from . import traced  # noqa: F401,E402  (any other model: groups from a recorded forward)
from .complexity import activation_bytes, check_input_size, check_memory, count_macs, count_params
from .family import Family
from .groups import Block, Group, Part, Producer
from . import weights
from .registry import (ARCH_FACTORY, FAMILIES, OUR_MODELS, TIMM_HEAD_KEYS, base_name, check_model_name,
                       create_model, default_arch, is_stock_timm, is_tagged, our_layout,
                       pretrained_classes, with_own_head)

__all__ = ["Family", "Group", "Part", "Producer", "FAMILIES", "layer_ids", "head_weight", "with_own_head", "OUR_MODELS", "create_model", "default_arch",
           "check_model_name", "check_input_size", "activation_bytes", "check_memory", "weights", "ARCH_FACTORY", "base_name", "is_stock_timm", "is_tagged", "pretrained_classes",
           "our_layout", "timm_export",
           "build_model", "infer_arch", "channel_groups", "registered_name", "describe_arch",
           "check_arch_matches", "scale_factor_names", "meta_model", "with_weights", "count_arch", "fold"]


def build_model(arch, **kwargs):
    """Build the exact shape an `arch` dict describes (kwargs: drop_path_rate, ...)."""
    family = FAMILIES.get(arch.get("family")) if isinstance(arch, dict) else None
    if family is None:
        raise UserError(f"unknown model arch family {arch.get('family') if isinstance(arch, dict) else arch!r}; "
                        f"known: {', '.join(FAMILIES)}")
    try:
        return family.from_arch(arch, **kwargs)
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise UserError(f"malformed arch {describe_arch(arch)}: {e}") from None


def with_weights(arch, state_dict):
    """The model an arch describes with these weights loaded, in eval mode."""
    model = build_model(arch)
    model.load_state_dict(weights.with_own_metadata(model, state_dict))
    return model.eval()


def meta_model(arch):
    """The model an arch describes, on the meta device (shapes only, no memory)."""
    with torch.device("meta"):
        return build_model(arch)


def count_arch(arch, input_size):
    """(params, MACs) of the shape an arch describes (FlopCounterMode on the meta device: the
    figures every table of the project uses; MACs = FLOPs / 2), counted once per shape."""
    return _count_arch(json.dumps(arch, sort_keys=True), input_size)


@functools.lru_cache(maxsize=64)
def _count_arch(arch_json, input_size):
    model = meta_model(json.loads(arch_json)).eval()
    return count_params(model), count_macs(model, input_size)


def infer_arch(state_dict):
    """Recognise the shape of a state dict in one of our layouts (e.g. a released checkpoint)."""
    for family in FAMILIES.values():
        try:
            arch = family.infer_arch(state_dict)
        except (KeyError, ValueError, IndexError, AttributeError) as e:  # a partial state dict
            raise UserError(f"the checkpoint's {family.__name__} weights are incomplete "
                            f"({type(e).__name__}: {e})") from None
        if arch is not None:
            return arch
    raise UserError("the checkpoint's weights are not a layout this toolkit knows (ConvNeXt, "
                    "isotropic ConvNeXt, CIFAR ResNet or CIFAR VGG keys)")


def timm_export(arch, state_dict):
    """(architecture, model_args, state dict) for timm's own class (the family's
    `timm_export`), or None when only this project's factories build the shape."""
    return FAMILIES[arch["family"]].timm_export(arch, state_dict)


def channel_groups(arch):
    """The family's channel groups (models/groups.py) for pruning."""
    return FAMILIES[arch["family"]].channel_groups(arch)


def removable_blocks(arch):
    """The residual blocks depth pruning may remove (models/groups.py `Block`), in order."""
    return FAMILIES[arch["family"]].removable_blocks(arch)


def fold(model):
    """The model's inference form (its family's `fold`, models/fold.py), in place."""
    if not hasattr(model, "fold"):
        raise UserError("folding needs one of this toolkit's model families, not a stock timm model")
    return model.fold()


def layer_ids(model):
    """Layer-wise LR decay ids of a model's parameters: (name -> id, number of layers), from
    its family's rule, or for a stock timm model the first family that reads its names (timm's
    ConvNeXt layout); None when no rule applies."""
    names = [n for n, _ in model.named_parameters()]
    families = [type(model)] if isinstance(model, Family) else FAMILIES.values()
    return next((ids for ids in (f.layer_ids(names) for f in families) if ids is not None), None)


def head_weight(state_dict):
    """The classifier weight of a state dict of ours or of a stock timm model, or None."""
    keys = [f"{f.head_key}.weight" for f in FAMILIES.values()] + list(TIMM_HEAD_KEYS)
    return next((state_dict[k] for k in keys if k in state_dict), None)


def scale_factor_names(arch):
    """Keys of the per-channel scale factors the family's groups declare (BatchNorm weights;
    in ConvNeXt its LayerNorm weights and layer scale): what network slimming penalises."""
    return sorted({key for g in channel_groups(arch) for key in g.scales})


def registered_name(arch):
    """The registered model whose default shape is exactly `arch`, or None (only the names of
    the arch's family whose own defaults agree with it are built, on the meta device)."""
    family = FAMILIES.get(arch.get("family")) if isinstance(arch, dict) else None

    def plain(v):
        return list(v) if isinstance(v, tuple) else v

    def may_match(cls, defaults):
        return cls is family and all(plain(arch.get(k, v)) == plain(v) for k, v in defaults.items())
    return next((name for name, (cls, defaults) in OUR_MODELS.items()
                 if may_match(cls, defaults) and default_arch(name) == arch), None)


def named_dims(arch):
    """Budget names of the family's known pruned shapes -> --dims (e.g. {"3M": [...]}), or {}."""
    family = FAMILIES.get(arch.get("family")) if isinstance(arch, dict) else None
    return dict(family.named_dims(arch)) if family is not None else {}


def describe_arch(arch):
    """A one-line summary of a shape, naming the registered model that has it."""
    family = FAMILIES.get(arch.get("family")) if isinstance(arch, dict) else None
    if family is None:
        return repr(arch)
    try:
        text = family.describe(arch)
    except (KeyError, TypeError, ValueError, IndexError):
        text = f"a malformed {arch.get('family')} arch"
    name = registered_name(arch)
    return f"{text}, {arch.get('num_classes')} classes" + (f" (= {name})" if name else "")


def check_arch_matches(model, state_dict, what="the checkpoint", model_name="the model"):
    """Raise a UserError naming the mismatching tensors and the checkpoint's shape if
    `state_dict` (from `what`) does not fit `model` exactly."""
    own = model.state_dict()
    bad = [f"{k} is {list(v.shape)} in the checkpoint but {list(own[k].shape)} in the model"
           for k, v in state_dict.items() if k in own and own[k].shape != v.shape]
    bad += [f"{k} holds {str(v.dtype)[6:]} values, not floating point as the model's {str(own[k].dtype)[6:]}"
            for k, v in state_dict.items() if k in own and own[k].is_floating_point()
            and isinstance(v, torch.Tensor) and not v.is_floating_point()]
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    if not (bad or missing or unexpected):
        return
    for problems, label in ((bad, ""), (missing, "missing tensors: "), (unexpected, "unexpected tensors: ")):
        if problems:
            more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
            detail = label + ("; " if not label else ", ").join(problems[:3]) + more
            break
    try:
        held = describe_arch(infer_arch(state_dict))
    except UserError:
        held = "a layout this toolkit does not recognise"
    ours = describe_arch(getattr(model, "arch", type(model).__name__))
    raise UserError(f"{what} does not fit {model_name}: {detail}; the checkpoint holds {held}, "
                    f"{model_name} is {ours}")

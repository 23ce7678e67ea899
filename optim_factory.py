"""Parameter groups (weight decay, layer-wise LR decay) and optimizers via timm's factory.

Layer ids are read off the model's parameter names, so layer decay works for any depth and
shape of the official layouts (hierarchical `downsample_layers.s` / `stages.s.j`, isotropic
`stem` / `blocks.j`) and for timm's ConvNeXt layout (`stem`, `stages.s.downsample`,
`stages.s.blocks.j`). The official rule for [3, 3, 27, 3] is kept exactly: the stem is layer 0,
each stage is cut into chunks of 3 consecutive blocks (one layer id each), a stage's
downsampling layer shares the id of the stage's first chunk, and norm + head come last.
Isotropic models get one id per block. Unknown models get one id for everything.
"""
import logging
import math
import re

from timm.optim import create_optimizer_v2, list_optimizers

from errors import UserError

logger = logging.getLogger(__name__)

BLOCKS_PER_LAYER = 3  # official: "each group is three consecutive blocks"

_PATTERNS = [  # (regex, kind): stage / block indices are the groups
    (re.compile(r"^downsample_layers\.0\."), "stem"),
    (re.compile(r"^downsample_layers\.(\d+)\."), "down"),
    (re.compile(r"^stages\.(\d+)\.downsample\."), "down"),
    (re.compile(r"^stages\.(\d+)\.blocks\.(\d+)\."), "block"),
    (re.compile(r"^stages\.(\d+)\.(\d+)\."), "block"),
    (re.compile(r"^stem[._]"), "stem"),
    (re.compile(r"^blocks\.(\d+)\."), "iso"),
]


def _position(name):
    """(kind, indices) of a parameter name in one of the known layouts, or None."""
    for pattern, kind in _PATTERNS:
        m = pattern.match(name)
        if m:
            return kind, tuple(int(g) for g in m.groups())
    return None


def convnext_layer_ids(param_names):
    """Map parameter names to layer ids; returns (ids: dict, num_layers).

    Ids run from 0 (stem) to num_layers + 1 (final norm and head, the full learning rate).
    """
    pos = {n: _position(n) for n in param_names}
    blocks = [p[1] for p in pos.values() if p and p[0] == "block"]
    iso = [p[1][0] for p in pos.values() if p and p[0] == "iso"]
    if not blocks and not iso:  # unknown layout: a single layer, no decay
        logger.warning("layer decay: unknown parameter layout, every parameter gets the same LR")
        return {n: 1 for n in param_names}, 0
    first = {}  # stage -> layer id of its first chunk
    if blocks:
        depths = {}
        for s, j in blocks:
            depths[s] = max(depths.get(s, 0), j + 1)
        next_id = 1
        for s in sorted(depths):
            first[s] = next_id
            next_id += math.ceil(depths[s] / BLOCKS_PER_LAYER)
    else:
        next_id = max(iso) + 2
    num_layers = next_id - 1

    def layer_id(p):
        if p is None:
            return num_layers + 1
        kind, idx = p
        if kind == "stem":
            return 0
        if kind == "down":
            return first.get(idx[0], num_layers + 1)
        if kind == "block":
            return first[idx[0]] + idx[1] // BLOCKS_PER_LAYER
        return idx[0] + 1  # isotropic block j

    return {n: layer_id(p) for n, p in pos.items()}, num_layers


class LayerDecayValueAssigner:
    """LR scale per layer id: layer_decay ** (num_layers + 1 - id), 1.0 for the head.

    Args:
        model: the model whose parameter names define the layer ids.
        layer_decay (float): decay per layer (the official --layer_decay).
    """

    def __init__(self, model, layer_decay):
        self.ids, self.num_layers = convnext_layer_ids([n for n, _ in model.named_parameters()])
        self.values = [layer_decay ** (self.num_layers + 1 - i) for i in range(self.num_layers + 2)]

    def get_layer_id(self, var_name):
        return self.ids.get(var_name, self.num_layers + 1)

    def get_scale(self, layer_id):
        return self.values[layer_id]


def get_parameter_groups(model, weight_decay=1e-5, skip_list=(), get_num_layer=None,
                         get_layer_scale=None):
    """Optimizer param groups: no weight decay for 1-D tensors, biases and `skip_list` names;
    with `get_num_layer`, one group per (layer, decay) carrying "lr_scale".

    Args:
        model: the model (trainable parameters only are grouped).
        weight_decay (float): decay of the "decay" groups.
        skip_list: parameter names without weight decay (e.g. model.no_weight_decay()).
        get_num_layer, get_layer_scale: name -> layer id, layer id -> LR scale.
    """
    groups, names = {}, {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue  # frozen weights
        no_decay = param.ndim <= 1 or name.endswith(".bias") or name in skip_list
        group = "no_decay" if no_decay else "decay"
        layer_id = None
        if get_num_layer is not None:
            layer_id = get_num_layer(name)
            group = f"layer_{layer_id}_{group}"
        if group not in groups:
            scale = get_layer_scale(layer_id) if get_layer_scale is not None else 1.0
            groups[group] = {"weight_decay": 0.0 if no_decay else weight_decay, "params": [],
                             "lr_scale": scale}
            names[group] = []
        groups[group]["params"].append(param)
        names[group].append(name)
    for group, members in names.items():
        logger.debug("param group %s: lr_scale %.4g, weight_decay %g, %d tensors", group,
                     groups[group]["lr_scale"], groups[group]["weight_decay"], len(members))
    return list(groups.values())


def create_optimizer(args, model, get_num_layer=None, get_layer_scale=None,
                     filter_bias_and_bn=True, skip_list=None):
    """Build the optimizer named by args.opt (timm's names: adamw, sgd, momentum, lamb, ...).

    Args:
        args: flags opt, lr, weight_decay, momentum, opt_eps, opt_betas.
        model: the bare model (not DDP-wrapped).
        get_num_layer, get_layer_scale: layer decay (see LayerDecayValueAssigner).
        filter_bias_and_bn (bool): exclude 1-D params and biases from weight decay.
        skip_list: names without weight decay; default model.no_weight_decay().
    """
    if filter_bias_and_bn:
        if skip_list is None:
            skip_list = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
        params = get_parameter_groups(model, args.weight_decay, skip_list, get_num_layer,
                                      get_layer_scale)
    else:
        params = [{"params": [p for p in model.parameters() if p.requires_grad],
                   "weight_decay": args.weight_decay, "lr_scale": 1.0}]
    kwargs = {}
    if getattr(args, "opt_eps", None) is not None:
        kwargs["eps"] = args.opt_eps
    if getattr(args, "opt_betas", None) is not None:
        kwargs["betas"] = tuple(args.opt_betas)
    try:
        # weight decay lives in the groups; timm drops eps / betas where an optimizer has none
        return create_optimizer_v2(params, opt=args.opt, lr=args.lr, weight_decay=0.0,
                                   momentum=args.momentum, **kwargs)
    except ValueError as e:
        if args.opt.lower().split("_")[-1] not in list_optimizers():
            raise UserError(f"unknown --opt {args.opt!r}; timm knows: "
                            f"{', '.join(list_optimizers())}") from None
        raise UserError(f"--opt {args.opt}: {e}") from None
    except ImportError as e:
        raise UserError(f"--opt {args.opt} needs a package that is not installed: {e}") from None

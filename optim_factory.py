"""Parameter groups (weight decay, layer-wise LR decay) and optimizers via timm's factory.

Layer ids come from the model's family (`Family.layer_ids`, read off the parameter names:
ConvNeXt's official rule in the official and timm's layouts, one id per isotropic block);
a model no family's rule reads gets one id for everything.
"""
import logging

from timm.optim import create_optimizer_v2, list_optimizers

import models
from common.errors import UserError

logger = logging.getLogger(__name__)

class LayerDecayValueAssigner:
    """LR scale per layer id: layer_decay ** (num_layers + 1 - id), 1.0 for the head.

    Args:
        model: the model whose parameter names define the layer ids.
        layer_decay (float): decay per layer (the official --layer_decay).
    """

    def __init__(self, model, layer_decay):
        found = models.layer_ids(model)
        if found is None:
            logger.warning("layer decay: unknown parameter layout, every parameter gets the same LR")
            found = {n: 1 for n, _ in model.named_parameters()}, 0
        self.ids, self.num_layers = found
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

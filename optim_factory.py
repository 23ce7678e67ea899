"""Parameter groups (weight decay, layer-wise LR decay) and optimizers via timm's factory.

Layer ids come from the model's family (`Family.layer_ids`, read off the parameter names:
ConvNeXt's official rule in the official and timm's layouts, one id per isotropic block);
a model no family's rule reads gets one id for everything.
"""
import logging
from dataclasses import dataclass

from timm.optim import create_optimizer_v2, list_optimizers

import models
from common.config import Config, FieldError, Range, ranged
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


@dataclass(frozen=True)
class OptimConfig(Config):
    """The optimizer flags (main.py's names and defaults), checked when made."""
    opt: str = "adamw"
    lr: float = ranged(4e-3, Range(0))
    weight_decay: float = ranged(0.05, Range(0))
    momentum: float = ranged(0.9, Range(0, 1, hi_open=True))
    opt_eps: float | None = ranged(1e-8, Range(0, lo_open=True))
    opt_betas: tuple | None = None
    layer_decay: float = ranged(1.0, Range(0, 1, lo_open=True))

    @classmethod
    def of(cls, value):
        """An OptimConfig as it is, or one read from a namespace with the optimizer flags."""
        return value if isinstance(value, cls) else cls.from_args(value)

    def check(self):
        super().check()
        if self.opt_betas is not None and (len(self.opt_betas) != 2 or not all(0 <= b < 1 for b in self.opt_betas)):
            raise FieldError(type(self).__name__, "opt_betas", f"must be two values in [0, 1), got {list(self.opt_betas)}")


def create_optimizer(args, model, get_num_layer=None, get_layer_scale=None,
                     filter_bias_and_bn=True, skip_list=None):
    """Build the optimizer named by `opt` (timm's names: adamw, sgd, momentum, lamb, ...).

    Args:
        args: OptimConfig (or the official flags' namespace, read into one).
        model: the bare model (not DDP-wrapped).
        get_num_layer, get_layer_scale: layer decay (see LayerDecayValueAssigner).
        filter_bias_and_bn (bool): exclude 1-D params and biases from weight decay.
        skip_list: names without weight decay; default model.no_weight_decay().
    """
    cfg = OptimConfig.of(args)
    if filter_bias_and_bn:
        if skip_list is None:
            skip_list = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
        params = get_parameter_groups(model, cfg.weight_decay, skip_list, get_num_layer,
                                      get_layer_scale)
    else:
        params = [{"params": [p for p in model.parameters() if p.requires_grad],
                   "weight_decay": cfg.weight_decay, "lr_scale": 1.0}]
    kwargs = {}
    if cfg.opt_eps is not None:
        kwargs["eps"] = cfg.opt_eps
    if cfg.opt_betas is not None:
        kwargs["betas"] = tuple(cfg.opt_betas)
    try:
        # weight decay lives in the groups; timm drops eps / betas where an optimizer has none
        return create_optimizer_v2(params, opt=cfg.opt, lr=cfg.lr, weight_decay=0.0,
                                   momentum=cfg.momentum, **kwargs)
    except ValueError as e:
        if cfg.opt.lower().split("_")[-1] not in list_optimizers():
            raise UserError(f"unknown --opt {cfg.opt!r}; timm knows: "
                            f"{', '.join(list_optimizers())}") from None
        raise UserError(f"--opt {cfg.opt}: {e}") from None
    except ImportError as e:
        raise UserError(f"--opt {cfg.opt} needs a package that is not installed: {e}") from None

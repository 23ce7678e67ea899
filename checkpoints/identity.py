"""Which model a checkpoint holds, the one answer every tool uses: its weights, its shape (an
arch of ours or a registered name), how it was trained, its input size and the memory check,
its classifier, and the model built from it (`Held`, `read_held`, `load_held_model`)."""
import argparse
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

import models
from models import traced
from checkpoints.io import load_checkpoint_file
from common.errors import UserError

logger = logging.getLogger(__name__)

DEFAULT_INPUT_SIZE = 224  # the input size of a checkpoint that does not record one


def args_to_dict(args):
    """Flags (a Namespace, or a dict as checkpoints hold them) as a plain dict of JSON-able
    values, so weights_only loading accepts it; anything else is an empty dict."""
    def plain(v):
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):  # timm's train.py: model_kwargs
            return {str(k): plain(x) for k, x in v.items()}
        return str(v)  # e.g. a pathlib.Path set by run_with_submitit.py
    items = vars(args) if isinstance(args, argparse.Namespace) else args if isinstance(args, dict) else {}
    return {k: plain(v) for k, v in items.items()}


def saved_args(ckpt):
    """The flags a checkpoint was trained with, as a plain dict ({} when it has none)."""
    return args_to_dict(ckpt.get("args")) if isinstance(ckpt, dict) else {}


def model_state(checkpoint, model_key="model|module", model_prefix=""):
    """The model weights in a checkpoint: the first of `model_key` ('a|b') present, else
    `state_dict` (timm's train.py, PyTorch Lightning), else the checkpoint itself; with
    `model_prefix`, only keys under it, with the prefix removed; without one, a first name
    every key shares (Lightning's `model.`, DDP's `module.`) is removed.
    Refuses weights that hold NaN or infinite values (a diverged run)."""
    if not isinstance(checkpoint, dict):
        raise UserError("the checkpoint is not a dict of weights")
    keys = [k for k in model_key.split("|") if k in checkpoint] or \
        (["state_dict"] if isinstance(checkpoint.get("state_dict"), dict) else [])
    state = checkpoint[keys[0]] if keys else checkpoint
    if not isinstance(state, dict):
        raise UserError(f"the checkpoint's {model_key!r} entry is not a dict of weights")
    if model_prefix:
        state = {k[len(model_prefix):]: v for k, v in state.items() if k.startswith(model_prefix)}
    else:
        state = _without_shared_prefix(state)
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise UserError(f"the checkpoint holds no weights under {model_key!r}"
                        + (f" with prefix {model_prefix!r}" if model_prefix else ""))
    bad = models.weights.nonfinite_keys(tensors)
    if bad:
        raise UserError(f"the checkpoint's weights hold NaN or infinite values ({len(bad)} tensors, "
                        f"e.g. {bad[0]}): it comes from a diverged run and gives no meaningful result")
    return tensors


def _without_shared_prefix(state):
    """A state dict whose keys all start with one name and a dot (a wrapper's), without it."""
    heads = {k.split(".", 1)[0] for k in state if isinstance(k, str) and "." in k}
    if len(state) > 1 and len(heads) == 1 and all(isinstance(k, str) and "." in k for k in state):
        cut = len(heads.pop()) + 1
        return {k[cut:]: v for k, v in state.items()}
    return state


def held_model(ckpt, state, model_name=None):
    """Which model a checkpoint holds, the one answer every tool uses: (arch, None) for a shape
    of ours, or (None, name) for a registered model name. In order: `model_name` when given
    (the weights must then fit it), the checkpoint's `arch`, the shape read off its weights,
    the --model saved in its args (e.g. a stock timm model)."""
    if model_name and model_name.startswith(traced.TORCHVISION):  # built only through the traced family
        return traced.arch_of_weights(traced.builder_of_name(model_name), state, DEFAULT_INPUT_SIZE), None
    if model_name:
        return None, model_name
    if isinstance(ckpt, dict) and isinstance(ckpt.get("arch"), dict):
        return ckpt["arch"], None
    try:
        return models.infer_arch(state), None
    except UserError as e:
        name = saved_args(ckpt).get("model")
        if not isinstance(name, str):
            raise UserError(f"{e}; give --model NAME") from None
        logger.info("Model: --model %s, as saved in the checkpoint's args", name)
        return None, name


@dataclass(frozen=True)
class Held:
    """What a checkpoint holds and how it was trained: the one answer main.py, pruning, the
    calibration and studies, inference, export and the benchmark use (`read_held`).

    ckpt: the checkpoint as read; state: its model weights; arch: a shape of ours (else None);
    name: else a registered model name; trained: the flags it was trained with ({} if none).
    """
    ckpt: Any
    state: dict
    arch: dict | None
    name: str | None
    trained: dict

    @property
    def label(self):
        """How messages name the model."""
        if self.arch is None:
            return self.name
        return models.registered_name(self.arch) or models.describe_arch(self.arch)

    @property
    def trained_epochs(self):
        """Epochs of training the checkpoint records (its last epoch + 1), or None."""
        epoch = self.ckpt.get("epoch") if isinstance(self.ckpt, dict) else None
        return epoch + 1 if isinstance(epoch, int) and not isinstance(epoch, bool) and epoch >= 0 else None

    @property
    def num_classes(self):
        """Classes of the weights (the arch's, the head's rows, else the trained --nb_classes)."""
        if self.arch is not None and "num_classes" in self.arch:
            return self.arch["num_classes"]
        head = models.head_weight(self.state)
        return head.shape[0] if head is not None else self.trained.get("nb_classes")

    @property
    def trained_input_size(self):
        """The --input_size it was trained at, or None when it records none."""
        size = self.trained.get("input_size")
        return size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else None

    def input_size(self, given=None):
        """`given`, else the trained input size, else DEFAULT_INPUT_SIZE."""
        return given or self.trained_input_size or DEFAULT_INPUT_SIZE

    def data_args(self, data_set=None, data_path=None, input_size=None):
        """The data flags it was trained with (data set, paths, class count, input size,
        transform), overridden where given; a new data set or path drops the saved paths."""
        t = self.trained
        keep_paths = data_set is None and data_path is None
        import datasets  # here: torchvision and timm's transforms load only when data is read
        return datasets.default_data_args(
            input_size=self.input_size(input_size), crop_pct=t.get("crop_pct"),
            imagenet_default_mean_and_std=t.get("imagenet_default_mean_and_std", True),
            data_set=data_set or t.get("data_set") or "DIGITS",
            data_path=data_path or (t.get("data_path") if keep_paths else None),
            eval_data_path=t.get("eval_data_path") if keep_paths else None,
            nb_classes=self.num_classes or 1000)

    def check_size(self, input_size, batch_size=1, training=False, device="cpu"):
        """check_size of the model it holds (the one input-size check)."""
        return check_size(self.build, self.label, input_size, batch_size, training, device)

    def build(self, **kwargs):
        """The model it holds, without weights (load them with load_model_state)."""
        if self.arch is not None:
            return models.build_model(self.arch, **kwargs)
        head = models.head_weight(self.state)
        return models.create_model(self.name, **({"num_classes": head.shape[0]} if head is not None else {}),
                                   **kwargs)


def _check_unseen_settings(trained, name):
    """Refuse reading timm's weights as ours where the saved args say timm built them with a
    setting weights do not show and ours does not share (a LayerNorm eps other than 1e-6)."""
    kwargs = trained.get("model_kwargs")
    eps = kwargs.get("norm_eps") if isinstance(kwargs, dict) else None
    if eps is not None and eps != 1e-6:
        raise UserError(f"the checkpoint's args say timm built {name or 'it'} with norm_eps={eps}; this "
                        "toolkit's ConvNeXt uses 1e-6, which changes the logits: build it with timm and give "
                        "pruning.prune the live model (it is then traced, timm's own class kept)")


def read_held(ckpt, model_name=None, model_key="model|module", model_prefix=""):
    """Held for a loaded checkpoint (see model_state for the key / prefix, held_model for
    which model it names); weights in timm's layout are renamed into ours unless a stock timm
    model is named (given, or saved in the checkpoint's args), which reads its own."""
    state = model_state(ckpt, model_key, model_prefix)
    trained = saved_args(ckpt)
    name = model_name or trained.get("model")
    arch = ckpt.get("arch") if isinstance(ckpt, dict) else None
    foreign = isinstance(arch, dict) and arch.get("family") == "traced"
    if not (foreign or (isinstance(name, str) and (name.startswith(traced.TORCHVISION) or models.is_stock_timm(name)))):
        renamed = models.our_layout(state)
        if renamed is not state:
            _check_unseen_settings(trained, name)
        state = renamed
    arch, name = held_model(ckpt, state, model_name)
    return Held(ckpt, state, arch, name, trained)


def load_held_model(path, model_name=None, model_key="model|module"):
    """(the model a checkpoint file holds, its weights loaded; its Held)."""
    held = read_held(load_checkpoint_file(path), model_name, model_key)
    model = held.build()
    load_model_state(model, held.state, os.fspath(path))
    return model, held


def check_size(build, label, input_size, batch_size=1, training=False, device="cpu"):
    """Refuse an input size the model `build()` makes cannot run at, or whose activations exceed
    the device's memory; on a weightless (meta) copy, so nothing large is allocated. Returns it."""
    with torch.device("meta"):
        probe = build()
    models.check_input_size(probe, input_size, label)
    models.check_memory(probe, input_size, batch_size, training, device)
    return probe


def load_model_state(model, state_dict, what, drop_head_on_mismatch=False):
    """Load `state_dict` strictly into `model`; UserError naming each mismatching tensor.

    Args:
        what (str): where the weights come from, for messages ("--finetune x.pth").
        drop_head_on_mismatch (bool): fine-tuning: a head of another class count is dropped
            (the model keeps its fresh head) instead of being an error.
    """
    state = dict(state_dict)
    if drop_head_on_mismatch:  # the model keeps its fresh head
        state = models.with_own_head(model, state, lambda k, old, new: logger.info(
            "Removing key %s from pretrained checkpoint (%s -> %s)", k, old, new))
    models.check_arch_matches(model, state, what)
    model.load_state_dict(models.weights.with_own_metadata(model, state), strict=True)

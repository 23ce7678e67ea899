"""A training run's checkpoint: the official dict (model, optimizer, epoch, scaler, args, EMA)
plus our `arch`, and restoring a run from one."""
import logging

import torch

from checkpoints.identity import args_to_dict, load_model_state
from common.errors import UserError

logger = logging.getLogger(__name__)


def ema_module(model_ema):
    """The averaged module of timm's ModelEmaV2/V3 (`.module`) or the official ModelEma (`.ema`)."""
    return model_ema.module if hasattr(model_ema, "module") else model_ema.ema


def training_checkpoint(args, model, optimizer, loss_scaler, model_ema=None, epoch=None, **extra):
    """The official checkpoint dict (model, optimizer, epoch, scaler, args, EMA) plus our
    `arch` and any JSON-able extras (max_accuracy, ...)."""
    ckpt = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
            "scaler": loss_scaler.state_dict(), "args": args_to_dict(args), **extra}
    if getattr(model, "arch", None) is not None:
        ckpt["arch"] = model.arch
    if model_ema is not None:
        ckpt["model_ema"] = ema_module(model_ema).state_dict()
    return ckpt


def _top1_record(checkpoint, key, label):
    """A best top-1 a checkpoint records (0.0 when absent), refused unless a number in [0, 100]."""
    value = checkpoint.get(key, 0.0)
    value = value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 100:
        raise UserError(f"{label}: its {key} is {value!r}, not a top-1 in [0, 100]; the file is damaged "
                        "(a run resumed from it could never record a new best)")
    return float(value)


def restore_training(checkpoint, label, model_ema=None, optimizer=None, loss_scaler=None):
    """After the model weights are loaded: EMA, optimizer and scaler (the epoch to start at is
    the checkpoint's epoch + 1: main.py resolves it before the run folder is opened).

    Args:
        label (str): how messages name the checkpoint.
    Returns:
        dict with "max_accuracy" and "max_accuracy_ema" (0.0 when the checkpoint has none).
    """
    restored = {k: _top1_record(checkpoint, k, label) for k in ("max_accuracy", "max_accuracy_ema")}
    if model_ema is not None:
        ema_state = checkpoint.get("model_ema", checkpoint["model"])
        load_model_state(ema_module(model_ema), ema_state, f"model_ema of {label}")
    if optimizer is None or "optimizer" not in checkpoint or "epoch" not in checkpoint:
        return restored
    if not isinstance(checkpoint["epoch"], int):
        raise UserError(f"{label} is a '{checkpoint['epoch']}' checkpoint without a training "
                        "position; resume from a checkpoint-N.pth or use --finetune")
    try:
        optimizer.load_state_dict(checkpoint["optimizer"])
    except (ValueError, KeyError) as e:
        raise UserError(f"the optimizer state in {label} does not fit this run "
                        f"(different --opt or --layer_decay?): {e}") from None
    loss_scaler.load_state_dict(checkpoint.get("scaler") or {})
    logger.info("With optim & sched! Continuing at epoch %d", checkpoint["epoch"] + 1)
    return restored

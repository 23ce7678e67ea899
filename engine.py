"""One training epoch and one evaluation pass (the official engine.py, made cheap and exact).

- One code path for AMP and full precision: torch.autocast(enabled=use_amp) and a GradScaler
  that is only enabled for fp16 (utils.NativeScalerWithGradNormCount).
- Per-iteration values stay on the device until the next log line; then they are copied to
  the host in one transfer. So training costs at most one device-to-host sync per
  `print_freq` iterations, and a non-finite loss is caught at the next log line.
- Evaluation sums per-sample results on the device and counts only real samples: the
  padding of a DistributedSampler is never counted twice.
"""
import itertools
import logging
from contextlib import nullcontext

import torch
import torch.distributed as dist
from timm.utils import accuracy, unwrap_model

import utils
from common.errors import UserError

logger = logging.getLogger(__name__)


class NonFiniteLossError(UserError):
    """The training loss became NaN or infinite: training stops."""


def l1_subgradient(params, strength):
    """Network slimming's sparsity term: strength * sign(w) added to each scale factor's
    gradient (the subgradient of strength * |w|), once per optimizer step."""
    def add():
        for p in params:
            if p.grad is not None:
                p.grad.add_(torch.sign(p.detach()), alpha=strength)
    return add


def mean_abs(params):
    """Mean |w| over a list of tensors (the scale factors sparsity training shrinks)."""
    return float(torch.cat([p.detach().abs().flatten().float().cpu() for p in params]).mean())


def set_schedules(optimizer, lr_schedule_values, wd_schedule_values, it):
    """Set the learning rate (times each group's lr_scale) and weight decay of step `it`."""
    for group in optimizer.param_groups:
        if lr_schedule_values is not None:
            group["lr"] = float(lr_schedule_values[it]) * group.get("lr_scale", 1.0)
        if wd_schedule_values is not None and group["weight_decay"] > 0:
            group["weight_decay"] = float(wd_schedule_values[it])


def _grad_sync(model, sync):
    """DDP: skip the gradient all-reduce on accumulation steps (only the last one syncs)."""
    ddp = getattr(model, "_orig_mod", model)  # through torch.compile's wrapper
    if not sync and isinstance(ddp, torch.nn.parallel.DistributedDataParallel):
        return ddp.no_sync()
    return nullcontext()


class _PendingLog:
    """Per-iteration values held as device tensors until the next log line.

    Args:
        metric_logger: receives the values as floats.
        epoch (int): for the error message of a non-finite loss.
        log_writer: TensorboardLogger or None; its step at the start of the epoch is the base.
        wandb_logger: WandbLogger or None.
    """

    def __init__(self, metric_logger, epoch, log_writer=None, wandb_logger=None):
        self.metric_logger, self.epoch = metric_logger, epoch
        self.log_writer, self.wandb_logger = log_writer, wandb_logger
        self.tb_base = log_writer.step if log_writer is not None else 0
        self.rows = []

    def add(self, i, it, optimizer, **tensors):
        """Record iteration `i` (global step `it`): 0-d tensors (or None) and the current LRs."""
        lrs = [g["lr"] for g in optimizer.param_groups]
        wds = [g["weight_decay"] for g in optimizer.param_groups if g["weight_decay"] > 0]
        tensors = {k: (t.detach() if t is not None else None) for k, t in tensors.items()}
        self.rows.append((i, it, tensors, {"lr": max(lrs), "min_lr": min(lrs),
                                           "weight_decay": wds[-1] if wds else None}))

    def flush(self):
        """Copy everything recorded to the host at once, check the loss, log it."""
        flat = [t.float().reshape(()) for _, _, ts, _ in self.rows
                for t in ts.values() if t is not None]
        values = iter(torch.stack(flat).tolist() if flat else [])
        for i, it, tensors, floats in self.rows:
            row = {k: (next(values) if t is not None else None) for k, t in tensors.items()}
            if row["loss"] != row["loss"] or abs(row["loss"]) == float("inf"):
                raise NonFiniteLossError(
                    f"loss is {row['loss']} at epoch {self.epoch}, iteration {i}: stopping training "
                    "(try a lower --lr, --clip_grad, or --use_amp false)")
            self.metric_logger.update(**row, **floats)
            self._write(i, it, row, floats)
        self.rows = []

    def _write(self, i, it, row, floats):
        if self.log_writer is not None:
            step = self.tb_base + i
            self.log_writer.update(head="loss", step=step, loss=row["loss"], class_acc=row["class_acc"])
            self.log_writer.update(head="opt", step=step, lr=floats["lr"], min_lr=floats["min_lr"],
                                   weight_decay=floats["weight_decay"], grad_norm=row["grad_norm"])
        if self.wandb_logger is not None:
            self.wandb_logger.log_batch(it, loss=row["loss"], max_lr=floats["lr"],
                                        min_lr=floats["min_lr"], class_acc=row["class_acc"],
                                        grad_norm=row["grad_norm"])


def train_one_epoch(model, criterion, data_loader, optimizer, device, epoch, loss_scaler,
                    max_norm=None, model_ema=None, mixup_fn=None, log_writer=None,
                    wandb_logger=None, start_steps=0, lr_schedule_values=None,
                    wd_schedule_values=None, num_training_steps_per_epoch=None, update_freq=1,
                    use_amp=False, amp_dtype=torch.float16, channels_last=False, print_freq=10,
                    sparsity=0.0, scale_params=()):
    """Train for one epoch; returns the epoch averages (loss, lr, class_acc, ...).

    Args:
        model: the model to train (DDP-wrapped and/or compiled are fine).
        criterion: loss on (output, targets); one with `takes_inputs` (losses.DistillationLoss)
            is called as criterion(samples, output, targets) -> (loss, logged parts).
        data_loader: yields (samples, targets).
        optimizer: param groups may carry "lr_scale" (layer decay).
        device (torch.device): where to compute.
        epoch (int): epoch number, for logs.
        loss_scaler (utils.NativeScalerWithGradNormCount): backward / clip / step.
        max_norm (float | None): clip the gradient norm to this (None or 0: no clipping).
        model_ema: timm ModelEmaV2/V3 (or the official ModelEma) updated after each step, or None.
        mixup_fn: timm Mixup applied to each batch, or None.
        log_writer, wandb_logger: utils.TensorboardLogger / utils.WandbLogger, or None.
        start_steps (int): optimizer steps done before this epoch (index into the schedules).
        lr_schedule_values, wd_schedule_values: per-step LR / weight decay, or None.
        num_training_steps_per_epoch (int): optimizer steps to take; the loader may be longer.
        update_freq (int): gradient accumulation: one optimizer step per this many batches.
        use_amp (bool), amp_dtype (torch.dtype): autocast settings.
        channels_last (bool): feed inputs in channels-last memory format.
        print_freq (int): iterations between log lines (and host syncs).
        sparsity (float), scale_params: network slimming: add sparsity * sign(w) to the
            gradient of every scale factor in scale_params before each optimizer step.
    """
    model.train(True)
    update_freq = max(update_freq or 1, 1)
    steps = num_training_steps_per_epoch or len(data_loader) // update_freq
    n_iters = min(len(data_loader), steps * update_freq)
    metric_logger = utils.MetricLogger(delimiter="  ")
    metric_logger.add_meter("lr", utils.SmoothedValue(window_size=1, fmt="{value:.6f}"))
    metric_logger.add_meter("min_lr", utils.SmoothedValue(window_size=1, fmt="{value:.6f}"))
    pending = _PendingLog(metric_logger, epoch, log_writer, wandb_logger)
    memory_format = torch.channels_last if channels_last else torch.preserve_format
    second_order = getattr(optimizer, "is_second_order", False)
    ema_source = unwrap_model(model)
    before_step = l1_subgradient(scale_params, sparsity) if sparsity > 0 else None
    batches = itertools.islice(data_loader, n_iters)

    optimizer.zero_grad(set_to_none=True)
    for i, (samples, targets) in enumerate(
            metric_logger.log_every(batches, print_freq, f"Epoch: [{epoch}]", total=n_iters)):
        it = start_steps + i // update_freq  # global optimizer step
        last_micro = (i + 1) % update_freq == 0
        log_now = i % print_freq == 0 or i == n_iters - 1
        if i % update_freq == 0:
            set_schedules(optimizer, lr_schedule_values, wd_schedule_values, it)
        samples = samples.to(device, non_blocking=True, memory_format=memory_format)
        targets = targets.to(device, non_blocking=True)
        if mixup_fn is not None:
            samples, targets = mixup_fn(samples, targets)

        with _grad_sync(model, last_micro):
            with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                output = model(samples)
                parts = {}
                if getattr(criterion, "takes_inputs", False):  # distillation: teachers see samples
                    loss, parts = criterion(samples, output, targets)
                else:
                    loss = criterion(output, targets)
            grad_norm = loss_scaler(loss / update_freq, optimizer, clip_grad=max_norm,
                                    parameters=model.parameters(), create_graph=second_order,
                                    update_grad=last_micro, need_norm=True, before_step=before_step)
        if last_micro:
            optimizer.zero_grad(set_to_none=True)
            if model_ema is not None:
                model_ema.update(ema_source)

        class_acc = (output.argmax(-1) == targets).float().mean() if targets.ndim == 1 else None
        pending.add(i, it, optimizer, loss=loss, class_acc=class_acc, grad_norm=grad_norm, **parts)
        if log_now:
            pending.flush()

    pending.flush()
    metric_logger.synchronize_between_processes()
    logger.info("Averaged stats: %s", metric_logger)
    stats = {k: meter.global_avg for k, meter in metric_logger.meters.items()}
    if scale_params:
        stats["mean_abs_scale"] = mean_abs(scale_params)
        logger.info("Mean |scale factor| after epoch %d: %.6f", epoch, stats["mean_abs_scale"])
    return stats


@torch.inference_mode()
def evaluate(data_loader, model, device, use_amp=False, amp_dtype=torch.float16,
             channels_last=False, print_freq=10):
    """Top-1, top-5 and mean cross-entropy over the evaluation set.

    Under distributed evaluation (a DistributedSampler), each rank counts only its real
    samples and the sums are all-reduced, so the result is exact for any set size.

    Args:
        data_loader: yields (images, ..., target).
        model: the bare module (not DDP-wrapped: ranks may see different batch counts).
        device, use_amp, amp_dtype, channels_last, print_freq: as in train_one_epoch.
    Returns:
        dict with loss, acc1, acc5 (percent) and num_images.
    """
    criterion = torch.nn.CrossEntropyLoss(reduction="sum")
    metric_logger = utils.MetricLogger(delimiter="  ")
    model.eval()
    memory_format = torch.channels_last if channels_last else torch.preserve_format
    sampler = getattr(data_loader, "sampler", None)
    real = utils.num_real_samples(sampler) if sampler is not None else float("inf")
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, top-1 hits, top-5 hits
    seen = counted = 0
    for batch in metric_logger.log_every(data_loader, print_freq, "Test:"):
        images, target = batch[0], batch[-1]
        keep = int(min(len(target), real - seen))  # drop trailing sampler padding
        seen += len(target)
        if keep <= 0:
            continue
        images = images[:keep].to(device, non_blocking=True, memory_format=memory_format)
        target = target[:keep].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
            output = model(images)
        acc1, acc5 = accuracy(output, target, topk=(1, 5))  # percent of this batch
        hits = (torch.stack([acc1, acc5]).double() * (keep / 100.0)).round()
        sums += torch.cat([criterion(output.float(), target).double().reshape(1), hits])
        counted += keep
    totals = torch.cat([sums, sums.new_tensor([counted])])
    if isinstance(sampler, torch.utils.data.DistributedSampler) and utils.get_world_size() > 1:
        totals = totals.to(utils.dist_device())
        dist.all_reduce(totals)
    loss_sum, hits1, hits5, n = totals.tolist()
    d = max(n, 1)  # a rank whose share is empty (set smaller than the world) reports zeros
    stats = {"loss": loss_sum / d, "acc1": 100.0 * hits1 / d, "acc5": 100.0 * hits5 / d,
             "num_images": int(n)}
    logger.info("* Acc@1 %.3f Acc@5 %.3f loss %.3f", stats["acc1"], stats["acc5"], stats["loss"])
    return stats

"""Training helpers: flag parsing, logging, distributed setup, schedules and the AMP scaler.

Mirrors the official ConvNeXt `utils.py` (MetricLogger, init_distributed_mode, cosine_scheduler,
NativeScalerWithGradNormCount) on today's PyTorch and timm. Checkpoint files live in
checkpoint.py and run_folder.py, user errors in errors.py.
"""
import datetime
import logging
import os
import sys
import time
from collections import defaultdict, deque
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from checkpoints.identity import args_to_dict
from deploy.runners import AMP_DTYPES as RUN_DTYPES
from cli.flags import SCHEDULES
from common.config import Choice, Config, FieldError, Range, ranged
from common.errors import UserError

logger = logging.getLogger(__name__)


# --amp_dtype names -> autocast dtypes (main.py; the runtimes' own mapping, without "none")
AMP_DTYPES = {k: v for k, v in RUN_DTYPES.items() if v is not None}


# ----------------------------------------------------------------------------- metric logging

class SmoothedValue:
    """A series of floats: a windowed median / average and the global average.

    Args:
        window_size (int): how many recent values the median and average cover.
        fmt (str): format of `str()`, with fields median, avg, global_avg, max, value.
    """

    def __init__(self, window_size=20, fmt=None):
        self.deque = deque(maxlen=window_size)
        self.total = 0.0
        self.count = 0
        self.fmt = fmt or "{median:.4f} ({global_avg:.4f})"

    def update(self, value, n=1):
        self.deque.append(value)
        self.count += n
        self.total += value * n

    median = property(lambda self: float(np.median(self.deque)) if self.deque else 0.0)
    avg = property(lambda self: float(np.mean(self.deque)) if self.deque else 0.0)
    global_avg = property(lambda self: self.total / max(self.count, 1))
    max = property(lambda self: max(self.deque) if self.deque else 0.0)
    value = property(lambda self: self.deque[-1] if self.deque else 0.0)

    def __str__(self):
        return self.fmt.format(median=self.median, avg=self.avg, global_avg=self.global_avg,
                               max=self.max, value=self.value)


class MetricLogger:
    """Named SmoothedValues plus `log_every`, which logs progress with an ETA.

    Args:
        delimiter (str): separator between the meters in a log line.
    """

    def __init__(self, delimiter="\t"):
        self.meters = defaultdict(SmoothedValue)
        self.delimiter = delimiter

    def update(self, **kwargs):
        """Add plain numbers; None values are skipped (tensors: convert once, see engine.py)."""
        for k, v in kwargs.items():
            if v is not None:
                self.meters[k].update(float(v))

    def add_meter(self, name, meter):
        self.meters[name] = meter

    def __getattr__(self, attr):
        meters = self.__dict__.get("meters", {})
        if attr in meters:
            return meters[attr]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{attr}'")

    def __str__(self):
        return self.delimiter.join(f"{name}: {meter}" for name, meter in self.meters.items())

    def synchronize_between_processes(self):
        """Sum every meter's count and total over all processes (one all-reduce)."""
        if not is_dist_avail_and_initialized() or not self.meters:
            return
        names = sorted(self.meters)
        t = torch.tensor([[self.meters[n].count, self.meters[n].total] for n in names],
                         dtype=torch.float64, device=dist_device())
        dist.all_reduce(t)
        for n, (count, total) in zip(names, t.tolist()):
            self.meters[n].count, self.meters[n].total = int(count), total

    def log_every(self, iterable, print_freq, header="", total=None):
        """Yield from `iterable`, logging meters, ETA and timings every `print_freq` items.

        Args:
            iterable: the data loader (or any iterable).
            print_freq (int): log every this many items, and at the last one.
            header (str): prefix of each line.
            total (int | None): number of items when `iterable` has no len().
        """
        total = len(iterable) if total is None else total
        iter_time, data_time = SmoothedValue(fmt="{avg:.4f}"), SmoothedValue(fmt="{avg:.4f}")
        width = len(str(total))
        start = end = time.time()
        i = 0
        for obj in iterable:
            data_time.update(time.time() - end)
            yield obj
            iter_time.update(time.time() - end)
            if i % print_freq == 0 or i == total - 1:
                eta = datetime.timedelta(seconds=int(iter_time.global_avg * (total - i)))
                parts = [header, f"[{i:{width}d}/{total}]", f"eta: {eta}", str(self),
                         f"time: {iter_time}", f"data: {data_time}"]
                if torch.cuda.is_available():
                    parts.append(f"max mem: {torch.cuda.max_memory_allocated() / 2**20:.0f}")
                logger.info(self.delimiter.join(p for p in parts if p))
            i += 1
            end = time.time()
        elapsed = time.time() - start
        logger.info("%s Total time: %s (%.4f s / it)", header,
                    datetime.timedelta(seconds=int(elapsed)), elapsed / max(i, 1))


class TensorboardLogger:
    """Scalars to TensorBoard through torch.utils.tensorboard (imported only when used).

    Args:
        log_dir (str): folder for the event files.
    """

    def __init__(self, log_dir):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise UserError(f"--log_dir needs the tensorboard package ({e}); "
                            "pip install tensorboard") from None
        self.writer = SummaryWriter(log_dir=log_dir)
        self.step = 0

    def set_step(self, step=None):
        self.step = self.step + 1 if step is None else step

    def update(self, head="scalar", step=None, **kwargs):
        for k, v in kwargs.items():
            if v is not None:
                self.writer.add_scalar(f"{head}/{k}", float(v), self.step if step is None else step)

    def flush(self):
        self.writer.flush()


class WandbLogger:
    """Weights & Biases logging, as the official repo (wandb imported only when asked for).

    Args:
        args: the parsed flags (project, output_dir; logged as the run config).
    """

    def __init__(self, args):
        try:
            import wandb
        except ImportError:
            raise UserError("--enable_wandb true needs the wandb package: pip install wandb") from None
        self._wandb = wandb
        self.output_dir = args.output_dir
        if wandb.run is None:
            wandb.init(project=args.project, config=args_to_dict(args))

    def set_steps(self):
        """Batch-wise metrics follow the global step, epoch metrics the epoch."""
        self._wandb.define_metric("Rank-0 Batch Wise/*", step_metric="Rank-0 Batch Wise/global_train_step")
        self._wandb.define_metric("Global Train/*", step_metric="epoch")
        self._wandb.define_metric("Global Test/*", step_metric="epoch")

    def log_batch(self, step, **metrics):
        data = {f"Rank-0 Batch Wise/train_{k}": v for k, v in metrics.items() if v is not None}
        self._wandb.log({**data, "Rank-0 Batch Wise/global_train_step": step})

    def log_epoch_metrics(self, metrics):
        metrics = dict(metrics)
        self._wandb.summary["n_parameters"] = metrics.pop("n_parameters", None)
        data = {"epoch": metrics.pop("epoch")}
        for k, v in metrics.items():
            data[f"Global Train/{k}" if "train" in k else f"Global Test/{k}"] = v
        self._wandb.log(data)

    def log_checkpoints(self):
        artifact = self._wandb.Artifact(self._wandb.run.id + "_model", type="model")
        artifact.add_dir(self.output_dir)
        self._wandb.log_artifact(artifact, aliases=["latest", "best"])


# ----------------------------------------------------------------------------- distributed

def is_dist_avail_and_initialized():
    return dist.is_available() and dist.is_initialized()


def get_world_size():
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank():
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def is_main_process():
    return get_rank() == 0


def dist_device():
    """Where collective tensors must live: CUDA for NCCL, CPU for gloo."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
        else torch.device("cpu")


def setup_for_distributed(is_master):
    """Log INFO lines only on the main process; other ranks show warnings and errors."""
    logging.basicConfig(level=logging.INFO if is_master else logging.WARNING,
                        format="%(message)s", stream=sys.stdout, force=True)


def _ranks_from_env(args):
    """(rank, world_size, local_rank) from torchrun / launch, SLURM or OpenMPI; None if absent."""
    env = os.environ
    if args.dist_on_itp:
        os.environ["MASTER_ADDR"] = env.get("MASTER_ADDR", "127.0.0.1")
        args.dist_url = f"tcp://{env['MASTER_ADDR']}:{env['MASTER_PORT']}"
        return (int(env["OMPI_COMM_WORLD_RANK"]), int(env["OMPI_COMM_WORLD_SIZE"]),
                int(env["OMPI_COMM_WORLD_LOCAL_RANK"]))
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", args.local_rank))
    if "SLURM_PROCID" in env:
        rank = int(env["SLURM_PROCID"])
        world = int(env.get("SLURM_NTASKS", args.world_size))
        return rank, world, int(env.get("SLURM_LOCALID", rank % max(torch.cuda.device_count(), 1)))
    return None


def env_rank(args):
    """This process's rank as the launcher's environment says (0 without one), before the
    process group exists."""
    ranks = _ranks_from_env(args)
    return ranks[0] if ranks is not None else 0


def init_distributed_mode(args):
    """Join the process group described by the environment (torchrun, launch, SLURM).

    Sets args.distributed, args.rank, args.world_size, args.gpu (local rank) and args.dist_backend:
    NCCL when args.device is CUDA, gloo otherwise. Single process when no launcher is found.
    """
    ranks = _ranks_from_env(args)
    if ranks is None or ranks[1] < 2:
        args.distributed, args.rank, args.gpu = False, 0, max(args.local_rank, 0)
        setup_for_distributed(True)
        logger.info("Not using distributed mode")
        return
    args.rank, args.world_size, args.gpu = ranks
    args.distributed = True
    for key, value in (("RANK", args.rank), ("WORLD_SIZE", args.world_size), ("LOCAL_RANK", args.gpu)):
        os.environ[key] = str(value)
    cuda = str(args.device).startswith("cuda")
    if cuda:
        torch.cuda.set_device(args.gpu)
    args.dist_backend = "nccl" if cuda else "gloo"
    setup_for_distributed(args.rank == 0)
    logger.warning("| distributed init (rank %d of %d): %s, %s, local rank %d", args.rank,
                   args.world_size, args.dist_url, args.dist_backend, args.gpu)
    # the timeout turns a stalled or dead rank into an error instead of an endless wait
    dist.init_process_group(backend=args.dist_backend, init_method=args.dist_url,
                            world_size=args.world_size, rank=args.rank,
                            timeout=datetime.timedelta(seconds=args.dist_timeout))
    dist.barrier()


# Flags that differ from rank to rank by design.
PER_RANK_FLAGS = ("rank", "gpu", "local_rank", "world_size", "distributed", "dist_backend", "dist_url")


def check_same_flags(args):
    """Refuse, on every rank at once, a job whose ranks were launched with different flags (it
    would train and report a model that matches no checkpoint)."""
    if not is_dist_avail_and_initialized():
        return
    mine = {k: v for k, v in args_to_dict(args).items() if k not in PER_RANK_FLAGS}
    everyone = [None] * get_world_size()
    dist.all_gather_object(everyone, mine)
    for rank, theirs in enumerate(everyone):
        diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        if diff:
            k = diff[0]
            raise UserError(f"ranks {rank} and {get_rank()} were launched with different flags "
                            f"(--{k} {theirs.get(k)!r} vs {mine.get(k)!r}"
                            + (f", +{len(diff) - 1} more" if len(diff) > 1 else "")
                            + "): every rank must run the same command")


def sync_buffers(module):
    """Give every rank rank 0's buffers (BatchNorm running statistics): after the last training
    step each rank holds its own, and an evaluation must see the weights rank 0 saves."""
    if is_dist_avail_and_initialized():
        for buffer in module.buffers():
            dist.broadcast(buffer.data, 0)


def num_real_samples(sampler):
    """How many leading items of this rank's `sampler` are real data, not padding.

    torch's DistributedSampler (drop_last=False) pads the index list to a multiple of the
    world size; padding sits at global positions >= len(dataset), which on each rank are the
    trailing items. Evaluation counts only the real ones, so no sample is counted twice.
    """
    if isinstance(sampler, torch.utils.data.DistributedSampler) and not sampler.drop_last:
        return len(range(sampler.rank, len(sampler.dataset), sampler.num_replicas))
    return len(sampler)


# ----------------------------------------------------------------------------- AMP, schedules

class NativeScalerWithGradNormCount:
    """Backward, optional unscale + clip, optimizer step: one path with and without AMP.

    Args:
        enabled (bool): use a GradScaler (fp16 AMP); when False every scaler call is a no-op
            and this is a plain backward / clip / step.
        device (str): device type of the GradScaler.
    """
    state_dict_key = "amp_scaler"

    def __init__(self, enabled=False, device="cuda"):
        self._scaler = torch.amp.GradScaler(device, enabled=enabled)

    def __call__(self, loss, optimizer, clip_grad=None, parameters=None, create_graph=False,
                 update_grad=True, need_norm=False, before_step=None):
        """Returns the gradient norm (a tensor, no host sync) when clipping or asked, else None.

        `before_step()` may change the (unscaled) gradients before clipping and the step.
        """
        self._scaler.scale(loss).backward(create_graph=create_graph)
        if not update_grad:
            return None
        norm = None
        if clip_grad or need_norm or before_step is not None:
            self._scaler.unscale_(optimizer)  # the true gradients, not the scaled ones
        if before_step is not None:
            before_step()
        if clip_grad or need_norm:
            params = [p for p in parameters if p.grad is not None]
            norm = (torch.nn.utils.clip_grad_norm_(params, clip_grad) if clip_grad
                    else torch.nn.utils.get_total_norm([p.grad for p in params]))
        self._scaler.step(optimizer)
        self._scaler.update()
        return norm

    def state_dict(self):
        return self._scaler.state_dict()

    def load_state_dict(self, state_dict):
        if state_dict:  # a checkpoint written without fp16 AMP holds an empty scaler state
            self._scaler.load_state_dict(state_dict)




def step_scheduler(base_value, final_value, epochs, niter_per_ep, decay_epochs, decay_rate,
                   warmup_epochs=0, start_warmup_value=0, warmup_steps=-1, periodic=False):
    """Per-iteration values: linear warmup to `base_value`, then `base_value` times
    `decay_rate` per drop, floored at `final_value`. The drops fall on the first iteration of
    each epoch in `decay_epochs` (counted from 0, warmup included), or of every multiple of
    `decay_epochs[0]` when `periodic` (the step schedule)."""
    total = epochs * niter_per_ep
    warmup = warmup_steps if warmup_steps > 0 else warmup_epochs * niter_per_ep
    warmup = min(warmup, total)
    epoch = np.arange(warmup, total) // niter_per_ep
    if periodic:
        drops = epoch // decay_epochs[0]
    else:
        drops = np.searchsorted(np.asarray(decay_epochs), epoch, side="right")
    values = np.maximum(base_value * float(decay_rate) ** drops, final_value)
    return np.concatenate((np.linspace(start_warmup_value, base_value, warmup), values))


@dataclass(frozen=True)
class ScheduleConfig(Config):
    """The LR and weight-decay schedules (main.py's flags and defaults), checked when made.
    decay_rate / weight_decay_end left out resolve to 0.1 (step schedules) / weight_decay:
    `drop_rate` and `final_weight_decay` return them."""
    sched: str = ranged("cosine", Choice(SCHEDULES))
    lr: float = ranged(4e-3, Range(0))
    min_lr: float = ranged(1e-6, Range(0))
    epochs: int = ranged(300, Range(1, integer=True))
    warmup_epochs: int = ranged(20, Range(0))
    warmup_steps: int = ranged(-1, Range(-1, integer=True))
    decay_epochs: tuple | None = None
    decay_rate: float | None = ranged(None, Range(0, 1, lo_open=True, hi_open=True))
    weight_decay: float = ranged(0.05, Range(0))
    weight_decay_end: float | None = ranged(None, Range(0))

    @classmethod
    def of(cls, value):
        """A ScheduleConfig as it is, or one read from a namespace with the schedule flags."""
        return value if isinstance(value, cls) else cls.from_args(value)

    @property
    def drop_rate(self):
        return 0.1 if self.decay_rate is None else self.decay_rate

    @property
    def final_weight_decay(self):
        return self.weight_decay if self.weight_decay_end is None else self.weight_decay_end

    def check(self):
        super().check()
        owner = type(self).__name__
        if self.min_lr > self.lr:
            raise FieldError(owner, "min_lr", f"{self.min_lr} is above `lr` {self.lr}: the schedule would rise")
        if self.sched == "cosine":
            for name in ("decay_epochs", "decay_rate"):
                if getattr(self, name) is not None:
                    raise FieldError(owner, name, "applies to `sched` step or multistep, not the cosine schedule")
            return
        epochs = self.decay_epochs
        if not epochs:
            raise FieldError(owner, "decay_epochs", f"is needed by `sched` {self.sched}")
        if self.sched == "step" and (len(epochs) != 1 or epochs[0] < 1):
            raise FieldError(owner, "decay_epochs", f"takes one period >= 1 with `sched` step, got {list(epochs)}")
        if self.sched == "multistep" and (any(b <= a for a, b in zip(epochs, epochs[1:])) or epochs[0] < 1):
            raise FieldError(owner, "decay_epochs", f"must be increasing epochs >= 1, got {list(epochs)}")

    def check_drops_happen(self):
        """A training run: every step drop falls inside `epochs` (else it would never happen)."""
        if self.sched != "cosine" and self.decay_epochs[-1] >= self.epochs:
            what = "the first drop" if self.sched == "step" else "that drop"
            raise FieldError(type(self).__name__, "decay_epochs",
                             f"{self.decay_epochs[-1]} is not before `epochs` {self.epochs}: {what} would never happen")


def lr_scheduler(args, niter_per_ep):
    """The per-iteration LR of a ScheduleConfig (or the flags' namespace): the values a resumed
    run indexes by global step."""
    cfg = ScheduleConfig.of(args)
    common = dict(warmup_epochs=cfg.warmup_epochs, warmup_steps=cfg.warmup_steps)
    if cfg.sched == "cosine":
        return cosine_scheduler(cfg.lr, cfg.min_lr, cfg.epochs, niter_per_ep, **common)
    return step_scheduler(cfg.lr, cfg.min_lr, cfg.epochs, niter_per_ep, cfg.decay_epochs,
                          cfg.drop_rate, periodic=cfg.sched == "step", **common)


def cosine_scheduler(base_value, final_value, epochs, niter_per_ep, warmup_epochs=0,
                     start_warmup_value=0, warmup_steps=-1):
    """Per-iteration values: linear warmup to `base_value`, then cosine decay to `final_value`.

    Args:
        base_value, final_value (float): values after warmup and at the very end.
        epochs, niter_per_ep (int): schedule length is epochs * niter_per_ep.
        warmup_epochs (int): warmup length in epochs; `warmup_steps` > 0 overrides it.
        start_warmup_value (float): value at the first warmup step.
    """
    total = epochs * niter_per_ep
    warmup = warmup_steps if warmup_steps > 0 else warmup_epochs * niter_per_ep
    warmup = min(warmup, total)
    warmup_values = np.linspace(start_warmup_value, base_value, warmup)
    i = np.arange(total - warmup)
    cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * i / max(len(i), 1)))
    return np.concatenate((warmup_values, cosine))

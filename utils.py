"""Shared helpers: user errors, distributed setup, logging, schedules, AMP and checkpoint I/O.

Mirrors the official ConvNeXt `utils.py` (MetricLogger, init_distributed_mode, cosine_scheduler,
NativeScalerWithGradNormCount, save_model, auto_load_model) on today's PyTorch and timm.
"""
import argparse
import datetime
import glob
import logging
import os
import pickle
import re
import sys
import tempfile
import time
from collections import defaultdict, deque

import numpy as np
import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit status 2."""


def str2bool(v):
    """Parse `true/false` style flag values (the official `--flag true` convention)."""
    if isinstance(v, bool):
        return v
    if v.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if v.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"boolean value expected (true/false), not {v!r}")


# --amp_dtype / --amp names -> autocast dtypes (main.py and the benchmarks)
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


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
    dist.init_process_group(backend=args.dist_backend, init_method=args.dist_url,
                            world_size=args.world_size, rank=args.rank)
    dist.barrier()


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
                 update_grad=True, need_norm=False):
        """Returns the gradient norm (a tensor, no host sync) when clipping or asked, else None."""
        self._scaler.scale(loss).backward(create_graph=create_graph)
        if not update_grad:
            return None
        norm = None
        if clip_grad or need_norm:
            params = [p for p in parameters if p.grad is not None]
            self._scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
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


# ----------------------------------------------------------------------------- checkpoint files

# Globals a released checkpoint may hold besides tensors; none can run code.
_NP_CORE = getattr(np, "_core", None) or np.core
SAFE_GLOBALS = [argparse.Namespace, np.dtype, _NP_CORE.multiarray.scalar,
                np.dtypes.Float64DType, np.dtypes.Float32DType, np.dtypes.Int64DType]


def save_checkpoint_file(obj, path):
    """Write `obj` with torch.save atomically: a temp file in the same folder, then rename."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pth", dir=folder)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; torch.save honours the umask
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_checkpoint_file(path, map_location="cpu"):
    """Load a checkpoint without running code from it (weights_only + an allow-list)."""
    path = os.fspath(path)
    if re.match(r"^[a-z][a-z0-9+.-]*://", path, re.I):
        raise UserError(f"cannot fetch {path}: there is no network here; download the file "
                        "and pass its local path")
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()
        hint = next((line.strip() for line in first if "GLOBAL" in line or "Unsupported" in line), "")
        raise UserError(f"refusing to load {path}: it needs code or classes outside the safe "
                        f"allow-list ({hint or 'unsupported pickle content'})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise UserError(f"cannot read checkpoint {path}: truncated or not a PyTorch file "
                        f"({str(e).splitlines()[0][:120]})") from None


def args_to_dict(args):
    """Flags (a Namespace, or a dict as checkpoints hold them) as a plain dict of JSON-able
    values, so weights_only loading accepts it; anything else is an empty dict."""
    def plain(v):
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return str(v)  # e.g. a pathlib.Path set by run_with_submitit.py
    items = vars(args) if isinstance(args, argparse.Namespace) else args if isinstance(args, dict) else {}
    return {k: plain(v) for k, v in items.items()}


def list_epoch_checkpoints(output_dir):
    """Sorted [(epoch, path)] of the checkpoint-N.pth files in `output_dir`."""
    found = []
    for path in glob.glob(os.path.join(glob.escape(os.fspath(output_dir)), "checkpoint-*.pth")):
        m = re.fullmatch(r"checkpoint-(\d+)\.pth", os.path.basename(path))
        if m:
            found.append((int(m.group(1)), path))
    return sorted(found)


def save_model(args, epoch, model_without_ddp, optimizer, loss_scaler, model_ema=None,
               max_accuracy=0.0, **extra):
    """Write checkpoint-{epoch}.pth (main process only, atomically) and prune old ones.

    Args:
        epoch (int | str): the epoch just finished, or a tag such as "best" / "best-ema".
        model_ema: a timm ModelEmaV2/V3 (or anything with `.module`), or None.
        max_accuracy (float): best top-1 so far, restored by auto_load_model.
        **extra: more JSON-able entries to store (e.g. max_accuracy_ema).
    """
    if not is_main_process():
        return
    ckpt = {"model": model_without_ddp.state_dict(), "optimizer": optimizer.state_dict(),
            "epoch": epoch, "scaler": loss_scaler.state_dict(), "args": args_to_dict(args),
            "max_accuracy": max_accuracy, **extra}
    if getattr(model_without_ddp, "arch", None) is not None:
        ckpt["arch"] = model_without_ddp.arch
    if model_ema is not None:
        ckpt["model_ema"] = ema_module(model_ema).state_dict()
    save_checkpoint_file(ckpt, os.path.join(os.fspath(args.output_dir), f"checkpoint-{epoch}.pth"))
    if isinstance(epoch, int) and args.save_ckpt_num > 0:
        for _, old in list_epoch_checkpoints(args.output_dir)[:-args.save_ckpt_num]:
            os.remove(old)


def ema_module(model_ema):
    """The averaged module of timm's ModelEmaV2/V3 (`.module`) or the official ModelEma (`.ema`)."""
    return model_ema.module if hasattr(model_ema, "module") else model_ema.ema


def resolve_resume(args):
    """With --auto_resume and no --resume, point args.resume at the newest checkpoint-N.pth."""
    if args.auto_resume and not args.resume and args.output_dir:
        found = list_epoch_checkpoints(args.output_dir)
        if found:
            args.resume = found[-1][1]
            logger.info("Auto resume checkpoint: %s", args.resume)
    return args.resume


def auto_load_model(args, model_without_ddp, optimizer, loss_scaler, model_ema=None, checkpoint=None):
    """Restore model, optimizer, scaler, EMA and epoch from --resume (or the newest checkpoint).

    Args:
        checkpoint (dict | None): the already loaded --resume file, to avoid reading it twice.
    Returns:
        dict with "max_accuracy" and "max_accuracy_ema" (0.0 when the checkpoint has none).
    """
    restored = {"max_accuracy": 0.0, "max_accuracy_ema": 0.0}
    if checkpoint is None:
        if not resolve_resume(args):
            return restored
        checkpoint = load_checkpoint_file(args.resume)
    load_model_state(model_without_ddp, model_state(checkpoint, "model"), f"--resume {args.resume}")
    logger.info("Resume checkpoint %s", args.resume)
    for key in restored:
        restored[key] = float(checkpoint.get(key, 0.0) or 0.0)
    if model_ema is not None:
        ema_state = checkpoint.get("model_ema", checkpoint["model"])
        load_model_state(ema_module(model_ema), ema_state, f"model_ema of {args.resume}")
    if args.eval or "optimizer" not in checkpoint or "epoch" not in checkpoint:
        return restored
    if not isinstance(checkpoint["epoch"], int):
        raise UserError(f"{args.resume} is a '{checkpoint['epoch']}' checkpoint without a "
                        "training position; resume from a checkpoint-N.pth or use --finetune")
    try:
        optimizer.load_state_dict(checkpoint["optimizer"])
    except (ValueError, KeyError) as e:
        raise UserError(f"the optimizer state in {args.resume} does not fit this run "
                        f"(different --opt or --layer_decay?): {e}") from None
    args.start_epoch = checkpoint["epoch"] + 1
    loss_scaler.load_state_dict(checkpoint.get("scaler") or {})
    logger.info("With optim & sched! Continuing at epoch %d", args.start_epoch)
    return restored


# ----------------------------------------------------------------------------- state dicts

def model_state(checkpoint, model_key="model|module", model_prefix=""):
    """The model weights in a checkpoint: the first of `model_key` ('a|b') present, else the
    checkpoint itself; with `model_prefix`, only keys under it, with the prefix removed."""
    if not isinstance(checkpoint, dict):
        raise UserError("the checkpoint is not a dict of weights")
    state = next((checkpoint[k] for k in model_key.split("|") if k in checkpoint), checkpoint)
    if model_prefix:
        state = {k[len(model_prefix):]: v for k, v in state.items() if k.startswith(model_prefix)}
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise UserError(f"the checkpoint holds no weights under {model_key!r}"
                        + (f" with prefix {model_prefix!r}" if model_prefix else ""))
    return tensors


def head_prefix(model):
    """Key prefix of the classifier: timm's get_classifier() where it exists, else `head.`."""
    get = getattr(model, "get_classifier", None)
    head = get() if callable(get) else None
    name = next((n for n, m in model.named_modules() if m is head), None) if head is not None else None
    return f"{name}." if name else "head."


def load_model_state(model, state_dict, what, drop_head_on_mismatch=False):
    """Load `state_dict` strictly into `model`; UserError naming each mismatching tensor.

    Args:
        what (str): where the weights come from, for messages ("--finetune x.pth").
        drop_head_on_mismatch (bool): fine-tuning: a head of another class count is dropped
            (the model keeps its fresh head) instead of being an error.
    """
    import models  # models imports this module: import lazily
    own = model.state_dict()
    state = dict(state_dict)
    if drop_head_on_mismatch:
        prefix = head_prefix(model)
        for k in [k for k in own if k.startswith(prefix)]:
            if k not in state or state[k].shape != own[k].shape:
                logger.info("Removing key %s from pretrained checkpoint (%s -> %s)", k,
                            list(state[k].shape) if k in state else "absent", list(own[k].shape))
                state[k] = own[k]  # the model keeps its fresh head
    models.check_arch_matches(model, state, what)
    model.load_state_dict(state, strict=True)

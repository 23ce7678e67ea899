"""ConvNeXt training, fine-tuning and evaluation: the official main.py flags on today's PyTorch.

    python main.py --model convnext_tiny --data_set DIGITS --input_size 32 --epochs 5 --device cpu
    python main.py --eval true --resume out/checkpoint-best.pth --data_set DIGITS --input_size 32
    torchrun --nproc_per_node 8 main.py --model convnext_tiny --data_path /path/to/imagenet-1k ...

See TRAINING.md for recipes. Bad input exits with one `error: ...` line and status 2.
"""
import argparse
import datetime
import json
import logging
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from timm.data.mixup import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import ModelEmaV3

import datasets
import models
import utils
from engine import evaluate, train_one_epoch
from optim_factory import LayerDecayValueAssigner, create_optimizer
from utils import NativeScalerWithGradNormCount as NativeScaler
from utils import UserError, str2bool

logger = logging.getLogger("main")

DEFAULT_MODEL = "convnext_tiny"


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are UserErrors: one `error:` line and exit status 2."""

    def error(self, message):
        raise UserError(message)


def get_args_parser():
    """The official flags (names, defaults, true/false parsing) plus the speed flags."""
    p = argparse.ArgumentParser("ConvNeXt training and evaluation script for image classification",
                                add_help=False)
    a = p.add_argument
    a("--batch_size", default=64, type=int, help="Per GPU batch size")
    a("--epochs", default=300, type=int)
    a("--update_freq", default=1, type=int, help="gradient accumulation steps")
    # Model parameters
    a("--model", default=None, type=str, metavar="MODEL",
      help=f"Name of model to train (default: {DEFAULT_MODEL}, or the shape stored in the "
           "--resume / --finetune checkpoint)")
    a("--drop_path", type=float, default=0, metavar="PCT", help="Drop path rate (default: 0.0)")
    a("--input_size", default=224, type=int, help="image input size")
    a("--layer_scale_init_value", default=1e-6, type=float, help="Layer scale initial values")
    # EMA related parameters
    a("--model_ema", type=str2bool, default=False)
    a("--model_ema_decay", type=float, default=0.9999)
    a("--model_ema_force_cpu", type=str2bool, default=False)
    a("--model_ema_eval", type=str2bool, default=False, help="Using ema to eval during training.")
    # Optimization parameters
    a("--opt", default="adamw", type=str, metavar="OPTIMIZER", help='Optimizer (default: "adamw")')
    a("--opt_eps", default=1e-8, type=float, metavar="EPSILON", help="Optimizer Epsilon")
    a("--opt_betas", default=None, type=float, nargs="+", metavar="BETA",
      help="Optimizer Betas (default: None, use opt default)")
    a("--clip_grad", type=float, default=None, metavar="NORM",
      help="Clip gradient norm (default: None, no clipping); works with and without AMP")
    a("--momentum", type=float, default=0.9, metavar="M", help="SGD momentum (default: 0.9)")
    a("--weight_decay", type=float, default=0.05, help="weight decay (default: 0.05)")
    a("--weight_decay_end", type=float, default=None,
      help="Final value of the weight decay (cosine schedule; default: --weight_decay)")
    a("--lr", type=float, default=4e-3, metavar="LR",
      help="learning rate (default: 4e-3), with total batch size 4096")
    a("--layer_decay", type=float, default=1.0)
    a("--min_lr", type=float, default=1e-6, metavar="LR", help="lower lr bound of the cosine schedule")
    a("--warmup_epochs", type=int, default=20, metavar="N", help="epochs to warmup LR")
    a("--warmup_steps", type=int, default=-1, metavar="N",
      help="num of steps to warmup LR, will overload warmup_epochs if set > 0")
    # Augmentation parameters
    a("--color_jitter", type=float, default=0.4, metavar="PCT", help="Color jitter factor")
    a("--aa", type=str, default="rand-m9-mstd0.5-inc1", metavar="NAME",
      help='AutoAugment / RandAugment policy; "none" disables it')
    a("--smoothing", type=float, default=0.1, help="Label smoothing (default: 0.1)")
    a("--train_interpolation", type=str, default="bicubic",
      help="Training interpolation (random, bilinear, bicubic default: bicubic)")
    # Evaluation parameters
    a("--crop_pct", type=float, default=None)
    # Random Erase params
    a("--reprob", type=float, default=0.25, metavar="PCT", help="Random erase prob (default: 0.25)")
    a("--remode", type=str, default="pixel", choices=["pixel", "rand", "const"], help='Random erase mode (default: "pixel")')
    a("--recount", type=int, default=1, help="Random erase count (default: 1)")
    a("--resplit", type=str2bool, default=False,
      help="Do not random erase first (clean) augmentation split (needs augmentation splits, "
           "which neither this repo nor the official one has: only false is accepted)")
    # Mixup params
    a("--mixup", type=float, default=0.8, help="mixup alpha, mixup enabled if > 0.")
    a("--cutmix", type=float, default=1.0, help="cutmix alpha, cutmix enabled if > 0.")
    a("--cutmix_minmax", type=float, nargs="+", default=None,
      help="cutmix min/max ratio, overrides alpha and enables cutmix if set")
    a("--mixup_prob", type=float, default=1.0,
      help="Probability of performing mixup or cutmix when either/both is enabled")
    a("--mixup_switch_prob", type=float, default=0.5,
      help="Probability of switching to cutmix when both mixup and cutmix enabled")
    a("--mixup_mode", type=str, default="batch", choices=["batch", "pair", "elem"],
      help='How to apply mixup/cutmix params. Per "batch", "pair", or "elem"')
    # Finetuning params
    a("--finetune", default="", help="finetune from checkpoint")
    a("--head_init_scale", default=1.0, type=float,
      help="classifier head initial scale, typically adjusted in fine-tuning")
    a("--model_key", default="model|module", type=str,
      help="which key to load from saved state dict, usually model or model_ema")
    a("--model_prefix", default="", type=str)
    # Dataset parameters
    a("--data_path", default="/datasets01/imagenet_full_size/061417/", type=str, help="dataset path")
    a("--eval_data_path", default=None, type=str, help="dataset path for evaluation")
    a("--nb_classes", default=1000, type=int, help="number of the classification types")
    a("--imagenet_default_mean_and_std", type=str2bool, default=True)
    a("--data_set", default="IMNET", choices=["CIFAR", *datasets.DATA_SETS], type=str,
      help="data set (CIFAR is the official name of CIFAR100)")
    a("--output_dir", default="", help="path where to save, empty for no saving")
    a("--log_dir", default=None, help="path where to tensorboard log")
    a("--device", default="cuda", help="device to use for training / testing (CPU if no CUDA)")
    a("--seed", default=0, type=int)
    a("--resume", default="", help="resume from checkpoint")
    a("--auto_resume", type=str2bool, default=True)
    a("--save_ckpt", type=str2bool, default=True)
    a("--save_ckpt_freq", default=1, type=int)
    a("--save_ckpt_num", default=3, type=int)
    a("--start_epoch", default=0, type=int, metavar="N", help="start epoch")
    a("--eval", type=str2bool, default=False, help="Perform evaluation only")
    a("--dist_eval", type=str2bool, default=True, help="Enabling distributed evaluation")
    a("--disable_eval", type=str2bool, default=False, help="Disabling evaluation during training")
    a("--num_workers", default=10, type=int)
    a("--pin_mem", type=str2bool, default=True,
      help="Pin CPU memory in DataLoader for more efficient (sometimes) transfer to GPU.")
    # distributed training parameters
    a("--world_size", default=1, type=int, help="number of distributed processes")
    a("--local_rank", "--local-rank", dest="local_rank", default=-1, type=int)
    a("--dist_on_itp", type=str2bool, default=False)
    a("--dist_url", default="env://", help="url used to set up distributed training")
    a("--use_amp", type=str2bool, default=False,
      help="Use PyTorch's AMP (Automatic Mixed Precision) or not")
    # Weights and Biases arguments
    a("--enable_wandb", type=str2bool, default=False, help="enable logging to Weights and Biases")
    a("--project", default="convnext", type=str, help="The name of the W&B project")
    a("--wandb_ckpt", type=str2bool, default=False, help="Save model checkpoints as W&B Artifacts.")
    # Speed (not in the official repo)
    a("--amp_dtype", default=None, choices=sorted(utils.AMP_DTYPES),
      help="AMP precision with --use_amp true (default: fp16 + GradScaler on CUDA, bf16 on CPU)")
    a("--channels_last", type=str2bool, default=False, help="channels-last memory format")
    a("--compile", type=str2bool, default=False, help="torch.compile the model")
    a("--print_freq", default=10, type=int, help="iterations between log lines")
    return p


def parse_args(argv=None):
    parser = ArgumentParser("ConvNeXt training and evaluation script", parents=[get_args_parser()])
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------- setup

def check_args(args):
    """Reject flag combinations that cannot work, before anything heavy happens."""
    if args.data_set == "CIFAR":
        args.data_set = "CIFAR100"  # the official repo's CIFAR is CIFAR-100
    if args.resplit:
        raise UserError("--resplit true needs augmentation splits, which this repo does not have")
    if min(args.batch_size, args.epochs, args.update_freq, args.print_freq) < 1:
        raise UserError("--batch_size, --epochs, --update_freq and --print_freq must be >= 1")
    if args.eval and args.disable_eval:
        raise UserError("--eval true needs the evaluation set: drop --disable_eval true")
    if args.compile and not torch._dynamo.is_dynamo_supported():
        raise UserError(f"--compile true: torch.compile is not supported with this Python "
                        f"({sys.version.split()[0]}) / PyTorch {torch.__version__}; run without it")


def resolve_device(args):
    """--device, falling back to the CPU (with a warning) when CUDA is absent."""
    if str(args.device).startswith("cuda") and not torch.cuda.is_available():
        logger.warning("warning: CUDA is not available, running on the CPU (--device cpu)")
        args.device = "cpu"
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise UserError(f"--device {args.device!r} is not a device (use cpu, cuda or cuda:N)") from None
    if args.use_amp:
        args.amp_dtype = args.amp_dtype or ("fp16" if device.type == "cuda" else "bf16")
        if args.amp_dtype == "fp16" and device.type != "cuda":
            raise UserError("--amp_dtype fp16 needs CUDA (fp16 training uses a GradScaler); "
                            "use --amp_dtype bf16 on the CPU")
        if args.amp_dtype == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise UserError("this GPU has no bfloat16 support: use --amp_dtype fp16")
    elif args.amp_dtype:
        logger.warning("warning: --amp_dtype has no effect without --use_amp true")
    return device


def setup(args):
    """Check flags, pick the device, join the process group, seed, make output folders."""
    check_args(args)
    # DDP warns once per process when a depthwise conv's weight gradient comes back with a
    # different stride on its size-1 axis: same memory layout, nothing to fix.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    device = resolve_device(args)
    utils.init_distributed_mode(args)
    if args.distributed and device.type == "cuda":
        device = torch.device("cuda", args.gpu)
    logger.info("%s", json.dumps(utils.args_to_dict(args), sort_keys=True))
    seed = args.seed + utils.get_rank()
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    torch.backends.cudnn.benchmark = True
    for folder in (args.output_dir, args.log_dir):
        if folder:
            os.makedirs(folder, exist_ok=True)
    return device


# ----------------------------------------------------------------------------- data

@dataclass
class Data:
    train: Any = None
    val: Any = None
    loader_train: Any = None
    loader_val: Any = None
    mixup_fn: Any = None


def _loader(dataset, sampler, batch_size, args, device, drop_last):
    workers = args.num_workers
    return torch.utils.data.DataLoader(
        dataset, sampler=sampler, batch_size=batch_size, num_workers=workers,
        pin_memory=args.pin_mem and device.type == "cuda", drop_last=drop_last,
        persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None)


def build_data(args, device):
    """Data sets, loaders (distributed samplers) and mixup; sets args.nb_classes."""
    data = Data()
    world, rank = utils.get_world_size(), utils.get_rank()
    if args.disable_eval:
        args.dist_eval = False
    else:
        data.val, args.nb_classes = datasets.build_dataset(is_train=False, args=args)
        sampler = (torch.utils.data.DistributedSampler(data.val, world, rank, shuffle=False)
                   if args.dist_eval else torch.utils.data.SequentialSampler(data.val))
        data.loader_val = _loader(data.val, sampler, int(1.5 * args.batch_size), args, device, False)
    if args.eval:
        return data  # evaluation only: no training set needed
    data.train, args.nb_classes = datasets.build_dataset(is_train=True, args=args)
    sampler = torch.utils.data.DistributedSampler(data.train, world, rank, shuffle=True, seed=args.seed)
    data.loader_train = _loader(data.train, sampler, args.batch_size, args, device, True)
    if args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None:
        if args.batch_size % 2:
            raise UserError("mixup / cutmix need an even --batch_size (or --mixup 0 --cutmix 0)")
        logger.info("Mixup is activated!")
        data.mixup_fn = Mixup(
            mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
            prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
            label_smoothing=args.smoothing, num_classes=args.nb_classes)
    return data


# ----------------------------------------------------------------------------- model

def load_sources(args):
    """(resume checkpoint, finetune checkpoint); --resume (or auto-resume) wins over --finetune."""
    resume = utils.load_checkpoint_file(args.resume) if utils.resolve_resume(args) else None
    finetune = None
    if args.finetune and resume is not None:
        logger.info("Resuming from %s: --finetune %s is not loaded", args.resume, args.finetune)
    elif args.finetune:
        finetune = utils.load_checkpoint_file(args.finetune)
        logger.info("Load ckpt from %s", args.finetune)
    return resume, finetune


def _checkpoint_arch(ckpt, state):
    """The shape a checkpoint holds: its `arch`, else read off the weights; None if neither
    works but the checkpoint's saved args name a model (e.g. a stock timm one)."""
    if ckpt.get("arch"):
        return ckpt["arch"]
    try:
        return models.infer_arch(state)
    except UserError:
        if _saved_model_name(ckpt) is None:
            raise
        return None


def _saved_model_name(ckpt):
    """--model of the run that wrote the checkpoint (args as a dict or an argparse.Namespace)."""
    saved = ckpt.get("args")
    name = saved.get("model") if isinstance(saved, dict) else getattr(saved, "model", None)
    return name if isinstance(name, str) else None


def _model_from_arch(args, arch, finetuning, kwargs):
    """Rebuild the exact shape of a checkpoint (a fresh head of nb_classes when fine-tuning)."""
    source = f"--finetune {args.finetune}" if finetuning else f"--resume {args.resume}"
    if finetuning:
        arch = {**arch, "num_classes": args.nb_classes}
    elif arch.get("num_classes") != args.nb_classes:
        raise UserError(f"{source} has {arch.get('num_classes')} classes but --data_set "
                        f"{args.data_set} has {args.nb_classes}; use --finetune to train a new head")
    logger.info("Model from %s: %s", source, models.describe_arch(arch))
    return models.build_model(arch, **kwargs)


def build_model(args, resume, finetune):
    """Create the model (by --model, or from the checkpoint's shape) and load --finetune."""
    kwargs = dict(drop_path_rate=args.drop_path, layer_scale_init_value=args.layer_scale_init_value,
                  head_init_scale=args.head_init_scale)
    ckpt = resume if resume is not None else finetune
    state = (utils.model_state(resume) if resume is not None else
             utils.model_state(finetune, args.model_key, args.model_prefix) if finetune is not None
             else None)
    model = None
    if args.model is None and ckpt is not None:
        arch = _checkpoint_arch(ckpt, state)
        if arch is not None:
            model = _model_from_arch(args, arch, resume is None, kwargs)
            source = args.resume if resume is not None else args.finetune
            args.model = models.registered_name(model.arch) or f"the arch stored in {source}"
        else:
            args.model = _saved_model_name(ckpt)
            logger.info("Model: --model %s, as saved in the checkpoint's args", args.model)
    if model is None:
        args.model = args.model or DEFAULT_MODEL
        model = models.create_model(args.model, pretrained=False, num_classes=args.nb_classes, **kwargs)
        if resume is not None:
            models.check_arch_matches(model, state, f"--resume {args.resume}", f"--model {args.model}")
    if finetune is not None:
        utils.load_model_state(model, state, f"--finetune {args.finetune}", drop_head_on_mismatch=True)
    return model


@dataclass
class Run:
    """Everything the loops need."""
    model: Any            # what training calls (DDP-wrapped and/or compiled)
    model_without_ddp: Any
    eval_model: Any       # the bare model, compiled with --compile true
    optimizer: Any = None
    loss_scaler: Any = None
    model_ema: Any = None
    criterion: Any = None
    lr_schedule: Any = None
    wd_schedule: Any = None
    steps_per_epoch: int = 0
    n_parameters: int = 0


def build_optimization(args, run, data, device):
    """Optimizer (layer decay), scaler, LR / WD schedules and the loss."""
    total_batch = args.batch_size * args.update_freq * utils.get_world_size()
    run.steps_per_epoch = len(data.train) // total_batch
    if run.steps_per_epoch < 1:
        raise UserError(f"the training set ({len(data.train)} images) is smaller than one "
                        f"optimizer step ({total_batch} images): lower --batch_size / --update_freq")
    assigner = LayerDecayValueAssigner(run.model_without_ddp, args.layer_decay) \
        if args.layer_decay != 1.0 else None
    if assigner is not None:
        logger.info("Layer decay: %d layers, scales %s", assigner.num_layers,
                    [round(v, 4) for v in assigner.values])
    run.optimizer = create_optimizer(
        args, run.model_without_ddp, get_num_layer=assigner.get_layer_id if assigner else None,
        get_layer_scale=assigner.get_scale if assigner else None)
    run.loss_scaler = NativeScaler(enabled=args.use_amp and args.amp_dtype == "fp16", device=device.type)
    run.lr_schedule = utils.cosine_scheduler(args.lr, args.min_lr, args.epochs, run.steps_per_epoch,
                                             warmup_epochs=args.warmup_epochs,
                                             warmup_steps=args.warmup_steps)
    if args.weight_decay_end is None:
        args.weight_decay_end = args.weight_decay
    run.wd_schedule = utils.cosine_scheduler(args.weight_decay, args.weight_decay_end, args.epochs,
                                             run.steps_per_epoch)
    if data.mixup_fn is not None:
        run.criterion = SoftTargetCrossEntropy()  # smoothing is in the mixup targets
    elif args.smoothing > 0:
        run.criterion = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        run.criterion = torch.nn.CrossEntropyLoss()
    logger.info("LR = %.8f, batch size = %d, update frequency = %d, %d training examples, "
                "%d steps per epoch, criterion = %s", args.lr, total_batch, args.update_freq,
                len(data.train), run.steps_per_epoch, run.criterion)


def build_run(args, data, device):
    """Model, EMA, DDP / compile wrappers, optimization; then restore --resume."""
    resume, finetune = load_sources(args)
    model = build_model(args, resume, finetune).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    run = Run(model=model, model_without_ddp=model, eval_model=model,
              n_parameters=sum(p.numel() for p in model.parameters() if p.requires_grad))
    logger.info("number of params: %d", run.n_parameters)
    if args.model_ema:
        # created before the DDP wrapper, as in the official repo; restored below on resume
        run.model_ema = ModelEmaV3(model, decay=args.model_ema_decay,
                                   device="cpu" if args.model_ema_force_cpu else None)
        logger.info("Using EMA with decay = %.8f", args.model_ema_decay)
    if args.distributed:
        run.model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[args.gpu] if device.type == "cuda" else None)
    if args.compile:
        run.model, run.eval_model = torch.compile(run.model), torch.compile(model)
    if not args.eval:
        build_optimization(args, run, data, device)
    restored = utils.auto_load_model(args, model, run.optimizer, run.loss_scaler, run.model_ema,
                                     checkpoint=resume)
    return run, restored


# ----------------------------------------------------------------------------- loops

def _amp(args):
    return dict(use_amp=args.use_amp, amp_dtype=utils.AMP_DTYPES[args.amp_dtype or "fp16"],
                channels_last=args.channels_last, print_freq=args.print_freq)


def evaluate_only(args, data, run, device):
    stats = evaluate(data.loader_val, run.eval_model, device, **_amp(args))
    logger.info("Accuracy of the network on the %d test images: %.5f%%", stats["num_images"], stats["acc1"])
    return stats


def _save(args, run, epoch, best, new_best):
    """checkpoint-{epoch}.pth every --save_ckpt_freq epochs (and the last), plus the best ones.

    Args:
        best (dict): max_accuracy and max_accuracy_ema, stored for auto-resume.
        new_best (list[str]): "best" / "best-ema" when this epoch improved on them.
    """
    if not (args.output_dir and args.save_ckpt):
        return
    save = dict(args=args, model_without_ddp=run.model_without_ddp, optimizer=run.optimizer,
                loss_scaler=run.loss_scaler, model_ema=run.model_ema, **best)
    if (epoch + 1) % args.save_ckpt_freq == 0 or epoch + 1 == args.epochs:
        utils.save_model(epoch=epoch, **save)
    for tag in new_best:
        utils.save_model(epoch=tag, **save)


def validate(args, data, run, device, best, log_stats):
    """Evaluate the model (and the EMA with --model_ema_eval true); update `best` in place.

    Returns (stats, new_best): new_best lists "best" / "best-ema" when top-1 improved.
    """
    stats = evaluate(data.loader_val, run.eval_model, device, **_amp(args))
    logger.info("Accuracy of the model on the %d test images: %.1f%%", stats["num_images"], stats["acc1"])
    new_best = ["best"] if stats["acc1"] > best["max_accuracy"] else []
    best["max_accuracy"] = max(best["max_accuracy"], stats["acc1"])
    logger.info("Max accuracy: %.2f%%", best["max_accuracy"])
    log_stats.update({f"test_{k}": v for k, v in stats.items()})
    if run.model_ema is not None and args.model_ema_eval:
        ema_model = utils.ema_module(run.model_ema)
        ema_device = next(ema_model.parameters()).device  # the CPU with --model_ema_force_cpu
        ema = evaluate(data.loader_val, ema_model, ema_device, **_amp(args))
        logger.info("Accuracy of the model EMA on %d test images: %.1f%%", ema["num_images"], ema["acc1"])
        new_best += ["best-ema"] if ema["acc1"] > best["max_accuracy_ema"] else []
        best["max_accuracy_ema"] = max(best["max_accuracy_ema"], ema["acc1"])
        logger.info("Max EMA accuracy: %.2f%%", best["max_accuracy_ema"])
        log_stats.update({f"test_{k}_ema": v for k, v in ema.items()})
    return stats, new_best


def train(args, data, run, device, best):
    """The epoch loop: train, evaluate, checkpoint, log."""
    log_writer = utils.TensorboardLogger(args.log_dir) if args.log_dir and utils.is_main_process() else None
    wandb_logger = utils.WandbLogger(args) if args.enable_wandb and utils.is_main_process() else None
    logger.info("Start training for %d epochs", args.epochs)
    start_time = time.time()
    for epoch in range(args.start_epoch, args.epochs):
        data.loader_train.sampler.set_epoch(epoch)  # a new shuffle every epoch, also on one GPU
        if log_writer is not None:
            log_writer.set_step(epoch * run.steps_per_epoch * args.update_freq)
        if wandb_logger is not None:
            wandb_logger.set_steps()
        train_stats = train_one_epoch(
            run.model, run.criterion, data.loader_train, run.optimizer, device, epoch,
            run.loss_scaler, args.clip_grad, run.model_ema, data.mixup_fn, log_writer=log_writer,
            wandb_logger=wandb_logger, start_steps=epoch * run.steps_per_epoch,
            lr_schedule_values=run.lr_schedule, wd_schedule_values=run.wd_schedule,
            num_training_steps_per_epoch=run.steps_per_epoch, update_freq=args.update_freq, **_amp(args))
        log_stats = {**{f"train_{k}": v for k, v in train_stats.items()}, "epoch": epoch,
                     "n_parameters": run.n_parameters}
        new_best = []
        if data.loader_val is not None:
            stats, new_best = validate(args, data, run, device, best, log_stats)
            if log_writer is not None:
                log_writer.update(head="perf", step=epoch, test_acc1=stats["acc1"],
                                  test_acc5=stats["acc5"], test_loss=stats["loss"])
        _save(args, run, epoch, best, new_best)
        _write_log(args, log_stats, log_writer, wandb_logger)
    if wandb_logger is not None and args.wandb_ckpt and args.save_ckpt and args.output_dir:
        wandb_logger.log_checkpoints()
    logger.info("Training time %s", datetime.timedelta(seconds=int(time.time() - start_time)))


def _write_log(args, log_stats, log_writer, wandb_logger):
    if args.output_dir and utils.is_main_process():
        if log_writer is not None:
            log_writer.flush()
        with open(os.path.join(args.output_dir, "log.txt"), mode="a", encoding="utf-8") as f:
            f.write(json.dumps(log_stats) + "\n")
    if wandb_logger is not None:
        wandb_logger.log_epoch_metrics(log_stats)


def main(args):
    """Train or evaluate as the flags say; returns the last evaluation stats (or None)."""
    device = setup(args)
    data = build_data(args, device)
    run, best = build_run(args, data, device)
    if args.eval:
        return evaluate_only(args, data, run, device)
    train(args, data, run, device, best)
    return None


def _compile_failure(args, error):
    return getattr(args, "compile", False) and (
        isinstance(error, torch._dynamo.exc.TorchDynamoException)
        or type(error).__module__.startswith("torch._inductor"))


def cli(argv=None):
    """Entry point: run main(); a UserError becomes `error: <message>` and exit status 2."""
    utils.setup_for_distributed(True)
    args = None
    try:
        args = parse_args(argv)
        main(args)
        return 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        if not _compile_failure(args, e):
            raise
        print(f"error: torch.compile failed on this machine ({type(e).__name__}: "
              f"{str(e).splitlines()[0][:200]}); run with --compile false", file=sys.stderr)
        return 2
    finally:
        if utils.is_dist_avail_and_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(cli())

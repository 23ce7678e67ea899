"""main.py's flags: the official names and defaults, and the checks they pass before any
data or model is built (ranges, combinations, files, the model name).

Every bad value is one `error: ...` line and exit status 2 (errors.UserError).
"""
import argparse
import os
import re
import sys

from common.config import Range
from common.errors import ArgumentParser, HelpFormatter, UserError  # noqa: F401  (ArgumentParser: run_with_submitit)
from checkpoints.sources import check_source, set_download_timeout
from cli.flags import DATA_SETS, SCHEDULES, add_download_flag, str2bool
from deploy.runtime import AMP

DEFAULT_MODEL = "convnext_tiny"


def get_args_parser():
    """The official flags (names, defaults, true/false parsing) plus the speed flags."""
    p = argparse.ArgumentParser("ConvNeXt training and evaluation script for image classification",
                                add_help=False, formatter_class=HelpFormatter)
    a = p.add_argument
    a("--batch_size", default=64, type=int, help="Per GPU batch size")
    a("--epochs", default=300, type=int, help="training epochs")
    a("--update_freq", default=1, type=int, help="gradient accumulation steps")
    # Model parameters
    a("--model", default=None, type=str, metavar="MODEL",
      help=f"Name of model to train (default: the shape stored in the --resume / --finetune "
           f"checkpoint, else {DEFAULT_MODEL}); a timm pretrained tag (convnext_tiny.fb_in22k) "
           "starts from timm's weights")
    a("--drop_path", type=float, default=0, metavar="PCT", help="Drop path rate")
    a("--input_size", default=None, type=int,
      help="image input size (default: the --resume / --finetune checkpoint's, else 224)")
    a("--layer_scale_init_value", default=1e-6, type=float, help="Layer scale initial values")
    # EMA related parameters
    a("--model_ema", type=str2bool, default=False, help="keep an exponential moving average of the weights")
    a("--model_ema_decay", type=float, default=0.9999, help="EMA decay per step")
    a("--model_ema_force_cpu", type=str2bool, default=False, help="keep the EMA on the CPU")
    a("--model_ema_eval", type=str2bool, default=False, help="Using ema to eval during training.")
    # Optimization parameters
    a("--opt", default="adamw", type=str, metavar="OPTIMIZER", help="Optimizer")
    a("--opt_eps", default=1e-8, type=float, metavar="EPSILON", help="Optimizer Epsilon")
    a("--opt_betas", default=None, type=float, nargs="+", metavar="BETA",
      help="Optimizer Betas, two values (default: the optimizer's own)")
    a("--clip_grad", type=float, default=None, metavar="NORM",
      help="Clip gradient norm (default: no clipping); works with and without AMP")
    a("--momentum", type=float, default=0.9, metavar="M", help="SGD momentum")
    a("--weight_decay", type=float, default=0.05, help="weight decay")
    a("--weight_decay_end", type=float, default=None,
      help="Final value of the weight decay (cosine schedule; default: --weight_decay)")
    a("--lr", type=float, default=4e-3, metavar="LR",
      help="learning rate, for a total batch size of 4096")
    a("--layer_decay", type=float, default=1.0, help="layer-wise LR decay (1: none)")
    a("--min_lr", type=float, default=1e-6, metavar="LR",
      help="lower lr bound: the cosine schedule's end, the step schedules' floor")
    a("--sched", default="cosine", choices=SCHEDULES,
      help="LR schedule after the warmup, per iteration: cosine (official), step (x --decay_rate "
           "every --decay_epochs E epochs) or multistep (x --decay_rate at each of --decay_epochs)")
    a("--decay_epochs", type=int, nargs="+", default=None, metavar="E",
      help="step: the period in epochs (one value); multistep: the epochs the LR drops at "
           "(counted from epoch 0, warmup included)")
    a("--decay_rate", type=float, default=None, metavar="G",
      help="step / multistep: the factor of each drop (default 0.1)")
    a("--warmup_epochs", type=int, default=20, metavar="N", help="epochs to warmup LR")
    a("--warmup_steps", type=int, default=-1, metavar="N",
      help="num of steps to warmup LR, will overload warmup_epochs if set > 0")
    # Augmentation parameters
    a("--color_jitter", type=float, default=0.4, metavar="PCT", help="Color jitter factor")
    a("--aa", type=str, default="rand-m9-mstd0.5-inc1", metavar="NAME",
      help='AutoAugment / RandAugment policy; "none" disables it')
    a("--smoothing", type=float, default=0.1, help="Label smoothing")
    a("--train_interpolation", type=str, default="bicubic",
      help="Training interpolation (random, bilinear, bicubic)")
    # Evaluation parameters
    a("--crop_pct", type=float, default=None,
      help="evaluation center-crop share (default: 224/256 below 384 px, else 1)")
    # Random Erase params
    a("--reprob", type=float, default=0.25, metavar="PCT", help="Random erase prob")
    a("--remode", type=str, default="pixel", choices=["pixel", "rand", "const"], help="Random erase mode")
    a("--recount", type=int, default=1, help="Random erase count")
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
    a("--finetune", default="", help="finetune from checkpoint (.pth / .safetensors, ours, official or "
                                       "timm's layout; a path, http(s) URL or hf-hub:ORG/NAME)")
    a("--head_init_scale", default=1.0, type=float,
      help="classifier head initial scale, typically adjusted in fine-tuning")
    a("--model_key", default="model|module", type=str,
      help="which key to load from saved state dict, usually model or model_ema")
    a("--model_prefix", default="", type=str, help="load only weights under this key prefix")
    # Dataset parameters
    a("--data_path", default="/datasets01/imagenet_full_size/061417/", type=str, help="dataset path")
    a("--eval_data_path", default=None, type=str, help="dataset path for evaluation")
    a("--nb_classes", default=1000, type=int, help="number of the classification types")
    a("--imagenet_default_mean_and_std", type=str2bool, default=True,
      help="normalise with the ImageNet mean/std (false: Inception's 0.5)")
    a("--data_set", default="IMNET", choices=["CIFAR", *DATA_SETS], type=str,
      help="data set (CIFAR is the official name of CIFAR100)")
    a("--output_dir", default="", help="path where to save, empty for no saving")
    a("--log_dir", default=None, help="path where to tensorboard log")
    a("--device", default="cuda", help="device to use for training / testing (CPU if no CUDA)")
    a("--seed", default=0, type=int, help="random seed (each rank adds its rank)")
    a("--resume", default="", help="resume from checkpoint (a path, http(s) URL or hf-hub:ORG/NAME)")
    a("--auto_resume", type=str2bool, default=True,
      help="continue from the newest checkpoint-N.pth in --output_dir")
    a("--save_ckpt", type=str2bool, default=True, help="write checkpoints to --output_dir")
    a("--save_format", default="pth", choices=("pth", "safetensors"),
      help="safetensors: each checkpoint-best(-ema).pth also gets a weights-only "
           "checkpoint-best(-ema).safetensors twin to share (no pickle; arch and args in its "
           "metadata); the checkpoints that resume stay .pth")
    a("--save_ckpt_freq", default=1, type=int, help="write checkpoint-N.pth every this many epochs")
    a("--save_ckpt_num", default=3, type=int,
      help="keep this many newest checkpoint-N.pth of this run (0: all)")
    a("--start_epoch", default=0, type=int, metavar="N", help="start epoch")
    a("--eval", type=str2bool, default=False, help="Perform evaluation only")
    a("--dist_eval", type=str2bool, default=True, help="Enabling distributed evaluation")
    a("--disable_eval", type=str2bool, default=False, help="Disabling evaluation during training")
    a("--num_workers", default=min(10, os.cpu_count() or 1), type=int,
      help="data loader processes (the official 10, at most the CPU count)")
    a("--pin_mem", type=str2bool, default=True,
      help="Pin CPU memory in DataLoader for more efficient (sometimes) transfer to GPU.")
    # distributed training parameters
    a("--world_size", default=1, type=int, help="number of distributed processes")
    a("--local_rank", "--local-rank", dest="local_rank", default=-1, type=int,
      help="set by torch.distributed.launch")
    a("--dist_on_itp", type=str2bool, default=False, help="OpenMPI launch (the official ITP cluster)")
    a("--dist_url", default="env://", help="url used to set up distributed training")
    a("--dist_timeout", default=300, type=float,
      help="seconds a collective may wait for another rank before the job stops with an error")
    a("--use_amp", type=str2bool, default=False,
      help="Use PyTorch's AMP (Automatic Mixed Precision) or not")
    # Weights and Biases arguments
    a("--enable_wandb", type=str2bool, default=False, help="enable logging to Weights and Biases")
    a("--project", default="convnext", type=str, help="The name of the W&B project")
    a("--wandb_ckpt", type=str2bool, default=False, help="Save model checkpoints as W&B Artifacts.")
    # Speed (not in the official repo)
    a("--amp_dtype", default=None, choices=sorted(a for a in AMP if a != "none"),
      help="AMP precision with --use_amp true (default: fp16 + GradScaler on CUDA, bf16 on CPU)")
    a("--channels_last", type=str2bool, default=False, help="channels-last memory format")
    a("--compile", type=str2bool, default=False, help="torch.compile the model")
    a("--print_freq", default=10, type=int, help="iterations between log lines")
    a("--fold", type=str2bool, default=False,
      help="with --eval true: evaluate the inference form (norm affines folded into the "
           "neighbouring layer; same logits up to rounding, see docs/design.md)")
    # Network slimming (not in the official repo)
    a("--sparsity", default=0.0, type=float,
      help="L1 penalty on the scale factors (BatchNorm weights; ConvNeXt: LayerNorm weights and "
           "layer scale): adds S * sign(w) to their gradients, as network slimming trains")
    # Knowledge distillation (not in the official repo)
    a("--teacher", default=None, nargs="+", metavar="CKPT",
      help="distil from these checkpoints of ours (shapes from the files; several form an ensemble)")
    a("--kd_temperature", default=5.0, type=float, help="distillation temperature T")
    a("--kd_alpha", default=0.5, type=float,
      help="weight of the distillation term (1: pure distillation from the teachers)")
    add_download_flag(p)
    return p


def parser():
    """main.py's parser (flag errors are UserErrors)."""
    return ArgumentParser("ConvNeXt training and evaluation script", parents=[get_args_parser()])


def parse_args(argv=None):
    return parser().parse_args(argv)


# ----------------------------------------------------------------------------- checks

# flag -> its allowed values (common.config.Range, as every config field declares them);
# None values mean "not set" and are not checked here.
RANGES = {
    "batch_size": Range(1), "epochs": Range(1), "update_freq": Range(1),
    "print_freq": Range(1), "input_size": Range(1),
    "drop_path": Range(0, 1, hi_open=True), "layer_scale_init_value": Range(0),
    "model_ema_decay": Range(0, 1, hi_open=True), "opt_eps": Range(0, lo_open=True),
    "clip_grad": Range(0, lo_open=True), "momentum": Range(0, 1, hi_open=True),
    "weight_decay": Range(0), "weight_decay_end": Range(0),
    "lr": Range(0), "layer_decay": Range(0, 1, lo_open=True), "min_lr": Range(0),
    "warmup_epochs": Range(0), "warmup_steps": Range(-1),
    "color_jitter": Range(0), "smoothing": Range(0, 1, hi_open=True),
    "crop_pct": Range(0, 1, lo_open=True), "reprob": Range(0, 1), "recount": Range(1),
    "mixup": Range(0), "cutmix": Range(0), "mixup_prob": Range(0, 1),
    "mixup_switch_prob": Range(0, 1), "head_init_scale": Range(0, lo_open=True),
    "nb_classes": Range(1), "seed": Range(0, 2 ** 31 - 1), "save_ckpt_freq": Range(1),
    "save_ckpt_num": Range(0), "start_epoch": Range(0), "num_workers": Range(0),
    "world_size": Range(1), "dist_timeout": Range(0, lo_open=True),
    "decay_rate": Range(0, 1, lo_open=True, hi_open=True),
    "sparsity": Range(0), "kd_temperature": Range(0, lo_open=True), "kd_alpha": Range(0, 1),
}


def check_ranges(args):
    for flag, allowed in RANGES.items():
        value = getattr(args, flag)
        problem = None if value is None else allowed(value)
        if problem:
            raise UserError(f"--{flag} {problem}")
    for flag, values in (("opt_betas", args.opt_betas), ("cutmix_minmax", args.cutmix_minmax)):
        if values is not None and len(values) != 2:
            raise UserError(f"--{flag} takes two values, got {len(values)}")
    if args.opt_betas is not None and not all(0 <= b < 1 for b in args.opt_betas):
        raise UserError(f"--opt_betas must be two values in [0, 1), got {args.opt_betas}")
    if args.cutmix_minmax is not None and not 0 < args.cutmix_minmax[0] < args.cutmix_minmax[1] <= 1:
        raise UserError(f"--cutmix_minmax must be MIN MAX with 0 < MIN < MAX <= 1, got {args.cutmix_minmax}")


def check_augmentation(args):
    """--aa must be a policy timm builds (it would fail with an assertion at the first batch)."""
    if not args.aa or args.aa.lower() == "none":
        return
    width = re.search(r"-w(\d+)", args.aa) if args.aa.startswith("augmix") else None
    if width and int(width.group(1)) < 1:  # timm builds it, then mixes no augmentation chain
        raise UserError(f"--aa {args.aa!r}: an AugMix width (-wN) must be at least 1")
    from timm.data.auto_augment import augment_and_mix_transform, auto_augment_transform, rand_augment_transform
    build = (rand_augment_transform if args.aa.startswith("rand") else
             augment_and_mix_transform if args.aa.startswith("augmix") else auto_augment_transform)
    try:
        build(args.aa, {"translate_const": 100, "img_mean": (124, 116, 104)})
    except (AssertionError, ValueError, KeyError, IndexError, TypeError):
        raise UserError(f"--aa {args.aa!r} is not an augmentation policy timm knows (e.g. "
                        "rand-m9-mstd0.5-inc1, augmix-m5-w3, original, v0, or none)") from None


def check_schedule(args):
    """The schedule flags make a ScheduleConfig (range and combination checks), and in a
    training run each step drop must happen."""
    import utils  # here: --help and flag errors come before torch loads
    schedule = utils.ScheduleConfig.from_args(args)
    if not args.eval:
        schedule.check_drops_happen()
    return schedule


def check_combinations(args):
    check_schedule(args)
    if not args.eval and args.start_epoch >= args.epochs:
        raise UserError(f"--start_epoch {args.start_epoch} leaves nothing to train with --epochs "
                        f"{args.epochs}")
    mixing = args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None
    if not args.eval and mixing and args.batch_size % 2:
        raise UserError("mixup / cutmix need an even --batch_size (or --mixup 0 --cutmix 0)")
    if args.resplit:
        raise UserError("--resplit true needs augmentation splits, which this repo does not have")
    if args.fold and not args.eval:
        raise UserError("--fold true applies to --eval true (a folded model is not trained)")
    if args.model_ema_eval and not args.model_ema:
        raise UserError("--model_ema_eval true needs --model_ema true (there is no EMA to evaluate)")
    if args.teacher and args.eval:
        raise UserError("--teacher applies to training; --eval true evaluates the model alone")
    if not args.teacher and (args.kd_alpha != 0.5 or args.kd_temperature != 5.0):
        raise UserError("--kd_alpha / --kd_temperature need --teacher CKPT [CKPT ...]")
    if args.eval and args.disable_eval:
        raise UserError("--eval true needs the evaluation set: drop --disable_eval true")
    if args.save_format != "pth" and (args.eval or not args.save_ckpt):
        raise UserError(f"--save_format {args.save_format} applies to the best checkpoints a "
                        "training run writes (not with --eval true or --save_ckpt false)")
    import models  # here: --help and flag errors come before torch loads
    import torch
    tagged = args.model is not None and models.is_tagged(args.model)
    if args.eval and not (args.resume or args.finetune or tagged or (args.auto_resume and args.output_dir)):
        raise UserError("--eval true needs trained weights: give --resume CHECKPOINT "
                        "(evaluating a freshly initialised model gives a meaningless accuracy)")
    if args.compile and not torch._dynamo.is_dynamo_supported():
        raise UserError(f"--compile true: torch.compile is not supported with this Python "
                        f"({sys.version.split()[0]}) / PyTorch {torch.__version__}; run without it")


def check_paths(args):
    for flag in ("output_dir", "log_dir"):
        folder = getattr(args, flag)
        if folder and os.path.exists(folder) and not os.path.isdir(folder):
            raise UserError(f"--{flag} {folder} is a file, not a folder")
    for flag in ("resume", "finetune"):
        if getattr(args, flag):
            check_source(getattr(args, flag), f"--{flag} {getattr(args, flag)}")
    for path in args.teacher or ():
        check_source(path, f"--teacher {path}")
    if args.model is not None:
        import models
        models.check_model_name(args.model)


def check_args(args):
    """Reject values and combinations that cannot give a meaningful run, before anything heavy."""
    set_download_timeout(args.download_timeout)
    if args.data_set == "CIFAR":
        args.data_set = "CIFAR100"  # the official repo's CIFAR is CIFAR-100
    check_ranges(args)
    check_augmentation(args)
    check_combinations(args)
    check_paths(args)


def main_flags():
    """main.py's option strings (what a study's --train_args may hold)."""
    return tuple(get_args_parser()._option_string_actions)

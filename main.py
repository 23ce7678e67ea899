"""ConvNeXt training, fine-tuning and evaluation: the official main.py flags on today's PyTorch.

    python main.py --model convnext_tiny --data_set DIGITS --input_size 32 --epochs 5 --device cpu
    python main.py --eval true --resume out/checkpoint-best.pth --data_set DIGITS --input_size 32
    torchrun --nproc_per_node 8 main.py --model convnext_tiny --data_path /path/to/imagenet-1k ...

See TRAINING.md for recipes. Bad input exits with one `error: ...` line and status 2.
"""
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

from cli import options
from common.errors import parse_first

if __name__ == "__main__":
    parse_first(options.parser)  # --help and flag errors before torch loads

import numpy as np  # noqa: E402
import torch  # noqa: E402
from timm.data.mixup import Mixup  # noqa: E402
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy  # noqa: E402
from timm.utils import ModelEmaV3  # noqa: E402

from checkpoints.identity import DEFAULT_INPUT_SIZE, args_to_dict, check_size, load_model_state, read_held  # noqa: E402
from checkpoints.io import load_checkpoint_file  # noqa: E402
from checkpoints.training_state import ema_module, restore_training, training_checkpoint  # noqa: E402
import datasets  # noqa: E402
import models  # noqa: E402
import utils  # noqa: E402
from engine import evaluate, train_one_epoch  # noqa: E402
from common.errors import UserError, first_line, run_cli  # noqa: E402
from training.losses import DistillationLoss, load_teachers  # noqa: E402
from optim_factory import LayerDecayValueAssigner, create_optimizer  # noqa: E402
from cli.options import DEFAULT_MODEL, check_args, parse_args  # noqa: E402
from common.files import drop_lock, hold_lock  # noqa: E402
from training.run_folder import RunFolder, list_epoch_checkpoints, resolve_resume  # noqa: E402
from utils import NativeScalerWithGradNormCount as NativeScaler  # noqa: E402

logger = logging.getLogger("main")


# ----------------------------------------------------------------------------- setup

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
    """Join the process group, seed, make the TensorBoard folder; returns the device."""
    # DDP warns once per process when a depthwise conv's weight gradient comes back with a
    # different stride on its size-1 axis: same memory layout, nothing to fix.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    device = resolve_device(args)
    utils.init_distributed_mode(args)
    utils.check_same_flags(args)
    if args.distributed and device.type == "cuda":
        device = torch.device("cuda", args.gpu)
    logger.info("%s", json.dumps(args_to_dict(args), sort_keys=True))
    seed = args.seed + utils.get_rank()
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    torch.backends.cudnn.benchmark = True
    if args.log_dir:
        os.makedirs(args.log_dir, exist_ok=True)
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
        logger.info("Mixup is activated!")
        data.mixup_fn = Mixup(
            mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
            prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
            label_smoothing=args.smoothing, num_classes=args.nb_classes)
    return data


# ----------------------------------------------------------------------------- model

@dataclass
class Sources:
    """The checkpoints a run starts from, read once: the files, the weights to load, and the
    model to build (`arch` of a shape of ours, else a registered `name`)."""
    resume: Any = None
    finetune: Any = None
    point: Any = None  # run_folder.ResumePoint: which checkpoint --resume / --auto_resume gave
    held: Any = None  # Held of the checkpoint the weights come from
    state: Any = None
    arch: Any = None
    name: Any = None


def load_sources(args):
    """Sources; --resume (or auto-resume) wins over --finetune."""
    point = resolve_resume(args.resume, args.auto_resume, args.output_dir)
    resume = load_checkpoint_file(point.path) if point.path else None
    finetune = None
    if args.finetune and resume is not None:
        logger.info("Resuming from %s: --finetune %s is not loaded", point.path, args.finetune)
    elif args.finetune:
        finetune = load_checkpoint_file(args.finetune)
        logger.info("Load ckpt from %s", args.finetune)
    if args.eval and resume is None and finetune is None and not (args.model and models.is_tagged(args.model)):
        raise UserError(f"--eval true needs trained weights: --output_dir {args.output_dir} holds "
                        "no checkpoint-N.pth; give --resume CHECKPOINT")
    if args.eval and args.model_ema_eval and "model_ema" not in (resume or {}):
        raise UserError("--eval true --model_ema_eval true: the checkpoint holds no model_ema weights "
                        "(give --resume a checkpoint that has them, or leave out --model_ema_eval)")
    src = Sources(resume, finetune, point=point)
    if resume is not None:
        src.held = read_held(resume, args.model, args.model_key, args.model_prefix)
    elif finetune is not None:
        src.held = read_held(finetune, args.model, args.model_key, args.model_prefix)
    if src.held is not None:
        src.state, src.arch, src.name = src.held.state, src.held.arch, src.held.name
    else:
        src.name = args.model or DEFAULT_MODEL
    return src


def resolve_input_size(args, held):
    """--input_size, else the one the checkpoint was trained at, else 224; a different size
    than the checkpoint's is allowed (fine-tuning at another resolution) but said."""
    trained = held.trained_input_size if held is not None else None
    if args.input_size is None:
        args.input_size = trained or DEFAULT_INPUT_SIZE
        if trained:
            logger.info("Input size %d px, as the checkpoint was trained", trained)
    elif trained and trained != args.input_size:
        logger.warning("warning: --input_size %d, but the checkpoint was trained at %d px%s",
                       args.input_size, trained,
                       ": its accuracy at this size may be far lower" if args.eval else "")


def check_input_size(args, src):
    """Refuse an --input_size the model cannot take, on a weightless (meta) copy."""
    arch, name = src.arch, src.name
    probe = check_size(lambda: models.build_model(arch) if arch is not None else models.create_model(name),
                       name or models.describe_arch(arch), args.input_size, args.batch_size, not args.eval, args.device)
    if (args.sparsity or args.fold) and getattr(probe, "arch", None) is None:
        flag = "--sparsity" if args.sparsity else "--fold true"
        raise UserError(f"{flag} needs one of this toolkit's model families (their own files "
                        f"declare scale factors and folding); {name} is a stock timm model")


def _model_from_arch(args, arch, finetuning, kwargs, resume_label):
    """Rebuild the exact shape of a checkpoint (a fresh head of nb_classes when fine-tuning)."""
    source = f"--finetune {args.finetune}" if finetuning else resume_label
    if finetuning:
        arch = {**arch, "num_classes": args.nb_classes}
    elif arch.get("num_classes") != args.nb_classes:
        raise UserError(f"{source} has {arch.get('num_classes')} classes but --data_set "
                        f"{args.data_set} has {args.nb_classes}; use --finetune to train a new head")
    logger.info("Model from %s: %s", source, models.describe_arch(arch))
    return models.build_model(arch, **kwargs)


def build_model(args, src):
    """Create the model (by --model, or from the checkpoint's shape) and load its weights."""
    kwargs = dict(drop_path_rate=args.drop_path, layer_scale_init_value=args.layer_scale_init_value,
                  head_init_scale=args.head_init_scale)
    if src.arch is not None:
        model = _model_from_arch(args, src.arch, src.resume is None, kwargs, src.point.label)
        source = src.point.path if src.resume is not None else args.finetune
        args.model = models.registered_name(model.arch) or f"the arch stored in {source}"
    else:  # a tagged name with no checkpoint (convnext_tiny.fb_in22k) starts from timm's weights
        args.model = src.name
        pretrained = src.held is None and models.is_tagged(src.name)
        classes = models.pretrained_classes(src.name) if pretrained else None
        if args.eval and classes is not None and classes != args.nb_classes:
            raise UserError(f"--eval true: {src.name} has a {classes}-class head, --data_set "
                            f"{args.data_set} has {args.nb_classes} classes (a fresh head gives a "
                            "meaningless accuracy): fine-tune it first")
        model = models.create_model(src.name, pretrained=pretrained, num_classes=args.nb_classes, **kwargs)
        if pretrained:
            logger.info("Weights: timm's pretrained %s (a new head when --nb_classes differs)", src.name)
    if src.resume is not None:
        load_model_state(model, src.state, src.point.label)
        logger.info("Resume checkpoint %s", src.point.path)
    elif src.finetune is not None:  # evaluating needs the trained head: it is never dropped then
        load_model_state(model, src.state, f"--finetune {args.finetune}",
                                    drop_head_on_mismatch=not args.eval)
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
    scale_params: Any = ()  # the scale factors (logged; penalised with --sparsity)


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
    schedule = utils.ScheduleConfig.from_args(args)
    run.lr_schedule = utils.lr_scheduler(schedule, run.steps_per_epoch)
    run.wd_schedule = utils.cosine_scheduler(schedule.weight_decay, schedule.final_weight_decay,
                                             schedule.epochs, run.steps_per_epoch)
    if data.mixup_fn is not None:
        run.criterion = SoftTargetCrossEntropy()  # smoothing is in the mixup targets
    elif args.smoothing > 0:
        run.criterion = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        run.criterion = torch.nn.CrossEntropyLoss()
    if args.teacher:
        teachers = load_teachers(args.teacher, device, args.channels_last, args.nb_classes)
        run.criterion = DistillationLoss(run.criterion, teachers, args.kd_temperature, args.kd_alpha)
        logger.info("Distilling from %d teacher(s) at T = %g, alpha = %g", len(teachers),
                    args.kd_temperature, args.kd_alpha)
    logger.info("LR = %.8f, batch size = %d, update frequency = %d, %d training examples, "
                "%d steps per epoch, criterion = %s", args.lr, total_batch, args.update_freq,
                len(data.train), run.steps_per_epoch, run.criterion)
    drops = (f", x{schedule.drop_rate:g} at epochs {args.decay_epochs}" if args.sched == "multistep" else
             f", x{schedule.drop_rate:g} every {args.decay_epochs[0]} epochs" if args.sched == "step" else "")
    logger.info("LR schedule: %s%s after %d warmup steps, floor %g", args.sched, drops,
                min(args.warmup_steps if args.warmup_steps > 0 else args.warmup_epochs * run.steps_per_epoch,
                    len(run.lr_schedule)), args.min_lr)


def build_run(args, data, device, src):
    """Model, EMA, DDP / compile wrappers, optimization; then restore --resume."""
    model = build_model(args, src)
    if args.fold:
        model = models.fold(model)
        logger.info("Evaluating the folded (inference) form of the model")
    model = model.to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    run = Run(model=model, model_without_ddp=model, eval_model=model,
              n_parameters=sum(p.numel() for p in model.parameters() if p.requires_grad))
    logger.info("number of params: %d", run.n_parameters)
    if getattr(model, "arch", None) is not None:
        params = dict(model.named_parameters())
        run.scale_params = [params[k] for k in models.scale_factor_names(model.arch) if k in params]
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
    restored = {"max_accuracy": 0.0, "max_accuracy_ema": 0.0}
    if src.resume is not None:
        restored = restore_training(src.resume, src.point.label, run.model_ema,
                                               run.optimizer, run.loss_scaler)
    return run, restored


# ----------------------------------------------------------------------------- loops

def _amp(args):
    return dict(use_amp=args.use_amp, amp_dtype=utils.AMP_DTYPES[args.amp_dtype or "fp16"],
                channels_last=args.channels_last, print_freq=args.print_freq)


def evaluate_only(args, data, run, device):
    """The model's accuracy, and the EMA's with --model_ema_eval true (keys *_ema)."""
    stats = evaluate(data.loader_val, run.eval_model, device, **_amp(args))
    logger.info("Accuracy of the network on the %d test images: %.5f%%", stats["num_images"], stats["acc1"])
    if run.model_ema is not None and args.model_ema_eval:
        ema_model = ema_module(run.model_ema)
        ema = evaluate(data.loader_val, ema_model, next(ema_model.parameters()).device, **_amp(args))
        logger.info("Accuracy of the model EMA on the %d test images: %.5f%%", ema["num_images"], ema["acc1"])
        stats = {**stats, **{f"{k}_ema": v for k, v in ema.items()}}
    return stats


def _save(args, run, folder, epoch, best, new_best):
    """The best checkpoints first, then checkpoint-{epoch}.pth (every --save_ckpt_freq epochs
    and the last): once checkpoint-{epoch}.pth exists, the epoch is complete on disk.

    Args:
        best (dict): max_accuracy and max_accuracy_ema, stored for auto-resume.
        new_best (list[str]): "best" / "best-ema" when this epoch improved on them.
    """
    if not (folder and args.save_ckpt and utils.is_main_process()):
        return
    ckpt = training_checkpoint(args, run.model_without_ddp, run.optimizer,
                                          run.loss_scaler, run.model_ema, epoch, **best)
    for tag in new_best:
        folder.save({**ckpt, "epoch": tag, "best_epoch": epoch}, f"checkpoint-{tag}.pth")
        if args.save_format == "safetensors":
            weights = ckpt["model_ema"] if tag == "best-ema" else ckpt["model"]
            folder.save_weights({**ckpt, "model": weights}, f"checkpoint-{tag}.safetensors")
    if (epoch + 1) % args.save_ckpt_freq == 0 or epoch + 1 == args.epochs:
        folder.save(ckpt, f"checkpoint-{epoch}.pth")
        folder.rotate(args.save_ckpt_num)


def validate(args, data, run, device, best, log_stats):
    """Evaluate the model (and the EMA with --model_ema_eval true); update `best` in place.

    Returns (stats, new_best): new_best lists "best" / "best-ema" when top-1 improved.
    """
    utils.sync_buffers(run.model_without_ddp)
    if run.model_ema is not None:
        utils.sync_buffers(ema_module(run.model_ema))
    stats = evaluate(data.loader_val, run.eval_model, device, **_amp(args))
    logger.info("Accuracy of the model on the %d test images: %.1f%%", stats["num_images"], stats["acc1"])
    new_best = ["best"] if stats["acc1"] > best["max_accuracy"] else []
    best["max_accuracy"] = max(best["max_accuracy"], stats["acc1"])
    logger.info("Max accuracy: %.2f%%", best["max_accuracy"])
    log_stats.update({f"test_{k}": v for k, v in stats.items()})
    if run.model_ema is not None and args.model_ema_eval:
        ema_model = ema_module(run.model_ema)
        ema_device = next(ema_model.parameters()).device  # the CPU with --model_ema_force_cpu
        ema = evaluate(data.loader_val, ema_model, ema_device, **_amp(args))
        logger.info("Accuracy of the model EMA on %d test images: %.1f%%", ema["num_images"], ema["acc1"])
        new_best += ["best-ema"] if ema["acc1"] > best["max_accuracy_ema"] else []
        best["max_accuracy_ema"] = max(best["max_accuracy_ema"], ema["acc1"])
        logger.info("Max EMA accuracy: %.2f%%", best["max_accuracy_ema"])
        log_stats.update({f"test_{k}_ema": v for k, v in ema.items()})
    return stats, new_best


def train(args, data, run, device, best, folder, start_epoch):
    """The epoch loop from `start_epoch`: train, evaluate, checkpoint, log."""
    log_writer = utils.TensorboardLogger(args.log_dir) if args.log_dir and utils.is_main_process() else None
    wandb_logger = utils.WandbLogger(args) if args.enable_wandb and utils.is_main_process() else None
    if folder is not None and utils.is_main_process():
        folder.prepare()
    logger.info("Start training for %d epochs", args.epochs)
    start_time = time.time()
    for epoch in range(start_epoch, args.epochs):
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
            num_training_steps_per_epoch=run.steps_per_epoch, update_freq=args.update_freq,
            sparsity=args.sparsity, scale_params=run.scale_params, **_amp(args))
        log_stats = {**{f"train_{k}": v for k, v in train_stats.items()}, "epoch": epoch,
                     "n_parameters": run.n_parameters}
        new_best = []
        if data.loader_val is not None:
            stats, new_best = validate(args, data, run, device, best, log_stats)
            if log_writer is not None:
                log_writer.update(head="perf", step=epoch, test_acc1=stats["acc1"],
                                  test_acc5=stats["acc5"], test_loss=stats["loss"])
        if folder is not None:
            folder.log(log_stats)
        _save(args, run, folder, epoch, best, new_best)
        _write_log(folder, log_stats, log_writer, wandb_logger)
    if wandb_logger is not None and args.wandb_ckpt and args.save_ckpt and args.output_dir:
        wandb_logger.log_checkpoints()
    logger.info("Training time %s", datetime.timedelta(seconds=int(time.time() - start_time)))


def _write_log(folder, log_stats, log_writer, wandb_logger):
    if folder is not None and utils.is_main_process():
        if log_writer is not None:
            log_writer.flush()
        folder.flush_log()
    if wandb_logger is not None:
        wandb_logger.log_epoch_metrics(log_stats)


def open_run_folder(args, src, start_epoch):
    """The RunFolder of a training run with --output_dir (None without one: nothing is saved).
    Refuses a folder another run is writing in (its lock) or holding another run's files;
    every rank checks, so all stop together."""
    if not args.output_dir:
        logger.warning("warning: no --output_dir: this run saves no checkpoint and no log")
        return None
    if utils.env_rank(args) == 0:  # the main process holds the folder's lock for the whole run
        hold_lock(args.output_dir, "--output_dir")
    folder = RunFolder(args.output_dir, src.resume, src.point.path, restart=args.auto_resume)
    try:
        folder.check(start_epoch)
    except UserError:
        drop_lock(args.output_dir)
        raise
    return folder


def _checkpoint_bytes(run):
    """About the size of one training checkpoint: weights, the optimizer's state, the EMA."""
    weights = sum(t.numel() * t.element_size() for t in run.model_without_ddp.state_dict().values())
    slots = max((len(s) for s in run.optimizer.state.values()), default=2)  # AdamW: 2 (+ step)
    return weights * (1 + slots + (run.model_ema is not None))


def _resume_epoch(args, resume):
    """The epoch a training run starts at: after the resumed checkpoint's, else --start_epoch."""
    epoch = resume.get("epoch") if resume is not None else None
    return epoch + 1 if isinstance(epoch, int) and "optimizer" in resume else args.start_epoch


def main(args):
    """Train or evaluate as the flags say; returns the last evaluation stats (or None)."""
    check_args(args)
    src = load_sources(args)
    resolve_input_size(args, src.held)
    check_input_size(args, src)
    folder = None
    if not args.eval:
        start_epoch = _resume_epoch(args, src.resume)
        if start_epoch >= args.epochs:
            logger.info("The run is already complete: %s holds epoch %d of --epochs %d; raise "
                        "--epochs to train longer", src.point.path, start_epoch - 1, args.epochs)
            return None
        folder = open_run_folder(args, src, start_epoch)
    device = setup(args)
    data = build_data(args, device)
    run, best = build_run(args, data, device, src)
    if args.eval:
        return evaluate_only(args, data, run, device)
    if folder is not None and utils.is_main_process():
        folder.check_space(_checkpoint_bytes(run))
    train(args, data, run, device, best, folder, start_epoch)
    return None


def _backend_failure(args, error):
    """One line for a failure of torch.compile or of a collective (a stalled or dead rank)."""
    if getattr(args, "compile", False) and (
            isinstance(error, torch._dynamo.exc.TorchDynamoException)
            or type(error).__module__.startswith("torch._inductor")):
        return (f"torch.compile failed on this machine ({type(error).__name__}: "
                f"{first_line(error)}); run with --compile false")
    if utils.is_dist_avail_and_initialized() and isinstance(error, (RuntimeError, torch.distributed.DistError)):
        return (f"rank {utils.get_rank()} of {utils.get_world_size()}: a collective failed, another "
                f"rank stalled or died (no answer within --dist_timeout {args.dist_timeout:g} s): "
                f"{first_line(error)}")
    return None


def _where_it_resumes(args):
    """After a stop: the newest complete epoch on disk, and what the same command does next."""
    if args is None or not getattr(args, "output_dir", None) or args.eval:
        return "nothing was being saved"
    done = list_epoch_checkpoints(args.output_dir)
    if not done:
        return (f"no epoch completed in {args.output_dir}; the same command starts again "
                "(the epoch in progress is lost)")
    epoch, path = done[-1]
    return (f"{path} holds epoch {epoch}; the same command with --auto_resume true resumes at epoch "
            f"{epoch + 1} (the epoch in progress is trained again)")


def cli(argv=None):
    """Entry point: run main(); one `error: ...` line and exit status 2 for bad input."""
    utils.setup_for_distributed(True)
    state = {}

    def run(argv):
        state["args"] = parse_args(argv)
        main(state["args"])

    try:
        return run_cli(run, argv, lambda e: _backend_failure(state.get("args"), e),
                       stopped=lambda: _where_it_resumes(state.get("args")))
    finally:
        if utils.is_dist_avail_and_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(cli())

#!/usr/bin/env python
"""engine.train_one_epoch against a bare PyTorch loop: same model, data, optimizer and AMP.

Both run over the same in-memory DataLoader (a TensorDataset, num_workers=0) with the same
model and optimizer objects, alternately (bare, engine, bare, engine, ...), so the ratio
engine / bare measures only what the engine adds: schedules, logging, accuracy, gradient
norm, loss checks (and EMA with --model_ema, which the bare loop then also updates).

    python scripts/bench_engine.py --model convnext_tiny --batch_size 32 --input_size 224 --amp bf16
"""
import logging
import statistics
import sys
import time


from deploy.runtime import AMP, Settings, check_settings
from common.errors import ArgumentParser, UserError, parse_first, run_cli


def get_args_parser():
    p = ArgumentParser("engine vs bare loop", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="convnext_tiny",
                   help="registered name, timm_convnext:<name> or a checkpoint path")
    p.add_argument("--input_size", type=int, default=224)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--steps", type=int, default=10, help="batches per round")
    p.add_argument("--rounds", type=int, default=5, help="bare/engine pairs timed")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--amp", default="none", choices=AMP, help="autocast dtype")
    p.add_argument("--channels_last", action="store_true")
    p.add_argument("--model_ema", action="store_true", help="update an EMA model in both loops")
    p.add_argument("--print_freq", type=int, default=10, help="engine log interval (iterations)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    return p


if __name__ == "__main__":
    parse_first(get_args_parser)  # --help and flag errors before torch loads

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import engine  # noqa: E402
import optim_factory  # noqa: E402
import utils  # noqa: E402
from deploy.specs import build  # noqa: E402
from deploy.runners import AMP_DTYPES, backward_step  # noqa: E402
from models.complexity import forward_cost, in_chans_of  # noqa: E402


logger = logging.getLogger("bench_engine")
TARGET = 0.90


class Setup:
    """The shared pieces: model, optimizer, loss scaler, criterion, loader, schedules, EMA.

    Args:
        args: parsed flags (model, batch_size, input_size, steps, amp, channels_last, ...).
    """

    def __init__(self, args):
        self.device = torch.device(args.device)
        self.amp_dtype = AMP_DTYPES[args.amp]
        self.channels_last, self.steps = args.channels_last, args.steps
        model = build(args.model)
        _, num_classes = forward_cost(model, args.input_size)
        fmt = torch.channels_last if args.channels_last else torch.contiguous_format
        self.model = model.to(self.device, memory_format=fmt)
        groups = optim_factory.get_parameter_groups(self.model, weight_decay=0.05)
        self.optimizer = torch.optim.AdamW(groups, lr=1e-6)  # tiny: random data, stable weights
        self.loss_scaler = utils.NativeScalerWithGradNormCount(enabled=args.amp == "fp16",
                                                               device=self.device.type)
        self.bare_scaler = torch.amp.GradScaler(self.device.type) if args.amp == "fp16" else None
        self.criterion = nn.CrossEntropyLoss()
        self.loader = self._loader(args, in_chans_of(model), num_classes)
        # per-step schedules as main.py builds them: engine sets LR / WD every step
        self.lr_values = utils.cosine_scheduler(1e-6, 1e-7, 1, args.steps)
        self.wd_values = utils.cosine_scheduler(0.05, 0.05, 1, args.steps)
        self.model_ema = None
        if args.model_ema:
            from timm.utils import ModelEmaV3
            self.model_ema = ModelEmaV3(self.model, decay=0.9999)

    @staticmethod
    def _loader(args, chans, num_classes):
        n = args.steps * args.batch_size
        g = torch.Generator().manual_seed(0)
        images = torch.randn(n, chans, args.input_size, args.input_size, generator=g)
        labels = torch.randint(0, num_classes, (n,), generator=g)
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels),
                                           batch_size=args.batch_size, shuffle=False,
                                           num_workers=0, drop_last=True)

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def bare_loop(s):
    """Forward, loss, backward, step: what anyone would write by hand, nothing more."""
    s.model.train()
    fmt = torch.channels_last if s.channels_last else torch.preserve_format
    for samples, targets in s.loader:
        samples = samples.to(s.device, non_blocking=True, memory_format=fmt)
        targets = targets.to(s.device, non_blocking=True)
        with torch.autocast(s.device.type, dtype=s.amp_dtype or torch.float32,
                            enabled=s.amp_dtype is not None):
            loss = s.criterion(s.model(samples), targets)
        backward_step(loss, s.optimizer, s.bare_scaler)
        s.optimizer.zero_grad(set_to_none=True)
        if s.model_ema is not None:
            s.model_ema.update(s.model)


def engine_loop(s, epoch, print_freq):
    """One engine.train_one_epoch over the same loader, with per-step LR/WD schedules."""
    engine.train_one_epoch(
        s.model, s.criterion, s.loader, s.optimizer, s.device, epoch, s.loss_scaler,
        max_norm=None, model_ema=s.model_ema, start_steps=0, lr_schedule_values=s.lr_values,
        wd_schedule_values=s.wd_values, num_training_steps_per_epoch=s.steps, update_freq=1,
        use_amp=s.amp_dtype is not None, amp_dtype=s.amp_dtype or torch.float16,
        channels_last=s.channels_last, print_freq=print_freq)


def timed(s, fn):
    """Seconds one call of fn takes, device work included."""
    s.sync()
    start = time.perf_counter()
    fn()
    s.sync()
    return time.perf_counter() - start


def run(args):
    """Warm up both loops, then alternate them `--rounds` times; print img/s and ratios."""
    s = Setup(args)
    images = args.steps * args.batch_size
    loops = {"bare": lambda: bare_loop(s), "engine": lambda: engine_loop(s, 0, args.print_freq)}
    for fn in loops.values():  # first calls pay one-time allocation costs
        fn()
    print(f"{args.model}: batch {args.batch_size}, {args.input_size} px, {args.device}, "
          f"amp={args.amp}, channels_last={int(args.channels_last)}, "
          f"ema={int(args.model_ema)}, {args.steps} steps per round\n")
    print("| round | bare img/s | engine img/s | engine/bare |\n|---|---|---|---|")
    rates = {name: [] for name in loops}
    for i in range(args.rounds):
        for name, fn in loops.items():
            rates[name].append(images / timed(s, fn))
        ratio = rates["engine"][-1] / rates["bare"][-1]
        print(f"| {i + 1} | {rates['bare'][-1]:.2f} | {rates['engine'][-1]:.2f} | {ratio:.3f} |",
              flush=True)
    ratios = [e / b for b, e in zip(rates["bare"], rates["engine"])]
    median = statistics.median(ratios)
    print(f"\nengine/bare median {median:.3f} (min {min(ratios):.3f}, max {max(ratios):.3f}) "
          f"over {args.rounds} rounds; bare median {statistics.median(rates['bare']):.2f} img/s, "
          f"engine median {statistics.median(rates['engine']):.2f} img/s; "
          f"target >= {TARGET:.2f}: {'met' if median >= TARGET else 'NOT met'}")
    return {"ratios": ratios, "ratio_median": median, **{f"{k}_img_s": v for k, v in rates.items()}}


def main(argv=None):
    """Time both loops; returns the ratios and rates. Bad input: UserError."""
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for name in ("input_size", "batch_size", "steps", "rounds", "print_freq"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1")
    if args.threads < 0:
        raise UserError("--threads cannot be negative")
    try:
        torch.device(args.device)
    except RuntimeError:
        raise UserError(f"--device {args.device!r} is not a device (cpu, cuda, cuda:N)") from None
    check_settings(Settings(args.device, args.input_size, args.batch_size, amp=args.amp))
    if args.threads:
        torch.set_num_threads(args.threads)
    return run(args)


if __name__ == "__main__":
    sys.exit(run_cli(main))

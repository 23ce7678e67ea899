"""The main job on the bundled data set: train ConvNeXt-T on DIGITS, prune it, fine-tune, compare.

Every step runs the real command-line tools (main.py, pruning/prune_convnext.py) as a user
would, streams their progress, and the results are gathered into one table. Each run writes
into a new time-stamped folder under --output_dir, so no earlier result is ever replaced.
About 4 minutes on 2 CPU cores.
"""
import argparse
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import models  # noqa: E402
from checkpoint import load_checkpoint_file  # noqa: E402

# Efficient ConvNeXt shapes: residual widths per stage, MLP width 4x.
SHAPES = {"13M": [96, 192, 384, 192], "3M": [32, 64, 128, 256]}
INPUT_SIZE = 32
DATA = ["--data_set", "DIGITS", "--input_size", str(INPUT_SIZE), "--num_workers", "0", "--device", "cpu"]
RECIPE = ["--batch_size", "32", "--warmup_epochs", "0", "--drop_path", "0", "--mixup", "0",
          "--cutmix", "0", "--reprob", "0", "--aa", "none", "--smoothing", "0", "--save_ckpt_freq", "1000",
          "--auto_resume", "false"]
# progress lines of the tools worth showing: training steps with their ETA, accuracies
PROGRESS = re.compile(r"^(Epoch: \[\d+\]  \[\s*\d+/\d+\]|Accuracy of the|params |MACs )")


def run(cmd):
    """Run one of our CLIs, echoing its progress lines; stop the demo with its output if it fails."""
    proc = subprocess.Popen([sys.executable, "-u"] + cmd, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if PROGRESS.match(line):
            fields = line.split("  ")
            short = "  ".join(f for f in fields if not f.startswith(
                ("time:", "data:", "min_lr", "weight_decay", "grad_norm")))
            print(f"     {short.rstrip()[:110]}", flush=True)
    if proc.wait() != 0:
        sys.exit(f"demo step failed: {' '.join(cmd)}\n{''.join(lines)[-3000:]}")
    return "".join(lines)


def last_accuracy(log):
    return float(re.findall(r"\* Acc@1 ([\d.]+)", log)[-1])


def evaluate(checkpoint):
    return last_accuracy(run(["main.py", "--eval", "true", "--resume", checkpoint] + DATA))


def train(out_dir, epochs, lr, source):
    """Train (source: --model NAME) or fine-tune (source: --finetune CKPT); last epoch's accuracy."""
    log = run(["main.py", "--epochs", str(epochs), "--lr", str(lr), "--output_dir", out_dir]
              + source + DATA + RECIPE)
    return os.path.join(out_dir, f"checkpoint-{epochs - 1}.pth"), last_accuracy(log)


def prune(source, out, criterion, dims):
    run(["pruning/prune_convnext.py", "--checkpoint", source, "--output", out, "--criterion", criterion,
         "--dims", *map(str, dims)])
    return out


def row(checkpoint, label, criterion, before, after):
    params, macs = models.count_arch(load_checkpoint_file(checkpoint)["arch"], INPUT_SIZE)
    after = f"{after:.2f}" if after is not None else "-"
    return f"| {label} | {criterion} | {params / 1e6:.2f}M | {macs / 1e6:.1f}M | {before:.2f} | {after} |"


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=5, help="training epochs of the dense model")
    parser.add_argument("--finetune_epochs", type=int, default=2)
    parser.add_argument("--criteria", nargs="+", default=["opnorm", "l1", "random"],
                        help="criteria compared at the 13M shape (the 3M shape uses the first)")
    parser.add_argument("--output_dir", default=os.path.join(ROOT, "demo_output"))
    args = parser.parse_args()
    if min(args.epochs, args.finetune_epochs) < 1:
        parser.error("--epochs and --finetune_epochs must be >= 1")
    start = time.time()
    out = os.path.join(args.output_dir, time.strftime("%Y%m%d-%H%M%S"))
    plan = [("13M", c) for c in args.criteria] + [("3M", args.criteria[0])]
    steps = 1 + len(plan)
    print(f"[1/{steps}] training ConvNeXt-T (convnext_tiny_unpruned_cifar10) on DIGITS at "
          f"{INPUT_SIZE} px, {args.epochs} epochs; results in {out}", flush=True)
    dense, dense_acc = train(os.path.join(out, "dense"), args.epochs, 2e-3,
                             ["--model", "convnext_tiny_unpruned_cifar10", "--save_ckpt", "true"])
    rows = [row(dense, "dense", "-", dense_acc, None)]
    for step, (shape, criterion) in enumerate(plan, start=2):
        print(f"[{step}/{steps}] pruning to the {shape} shape with {criterion}, then fine-tuning "
              f"{args.finetune_epochs} epochs", flush=True)
        pruned = prune(dense, os.path.join(out, f"{shape}_{criterion}.pth"), criterion, SHAPES[shape])
        pruned_acc = evaluate(pruned)
        _, tuned_acc = train(os.path.join(out, f"{shape}_{criterion}"), args.finetune_epochs, 1e-3,
                             ["--finetune", pruned, "--save_ckpt", "false"])
        rows.append(row(pruned, shape, criterion, pruned_acc, tuned_acc))
    print(f"\nDIGITS top-1 (%), {INPUT_SIZE} px, 360 test images; "
          f"fine-tuned {args.finetune_epochs} epochs\n")
    print("| shape | criterion | params | MACs | after pruning | after fine-tuning |")
    print("|---|---|---:|---:|---:|---:|")
    print("\n".join(rows))
    print(f"\ndemo finished in {time.time() - start:.0f} s; checkpoints in {out}")


if __name__ == "__main__":
    main()

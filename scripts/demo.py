"""The main job on the bundled data set: train ConvNeXt-T on DIGITS, compare pruning criteria
with seeds and spread, prune with the recommended one, fine-tune.

Every step runs the real command-line tools (main.py, scripts/compare_criteria.py,
pruning/prune.py) as a user would and streams their progress. Each run writes into a new
time-stamped folder under --output_dir, so no earlier result is ever replaced.
About 4 minutes on 2 CPU cores.
"""
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from common.errors import ArgumentParser, UserError, run_cli  # noqa: E402


INPUT_SIZE = 32
DATA = ["--data_set", "DIGITS", "--input_size", str(INPUT_SIZE), "--num_workers", "0", "--device", "cpu"]
RECIPE = ["--batch_size", "32", "--warmup_epochs", "0", "--drop_path", "0", "--mixup", "0",
          "--cutmix", "0", "--reprob", "0", "--aa", "none", "--smoothing", "0", "--save_ckpt_freq", "1000",
          "--auto_resume", "false"]
# compared right after pruning at both shapes; the first is pruned to 3M and fine-tuned
CRITERIA = ["opnorm", "opnorm:scope=producers,normalize=max,reduce=mean", "l1", "random"]
# progress lines of the tools worth showing: training steps with their ETA, accuracies, cells
PROGRESS = re.compile(r"^(Epoch: \[\d+\]  \[\s*\d+/\d+\]|Accuracy of the|params |MACs |\[\d+/\d+\] )")


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


def train(out_dir, epochs, lr, source):
    """Train (source: --model NAME) or fine-tune (source: --finetune CKPT); last epoch's accuracy."""
    log = run(["main.py", "--epochs", str(epochs), "--lr", str(lr), "--output_dir", out_dir]
              + source + DATA + RECIPE)
    return os.path.join(out_dir, f"checkpoint-{epochs - 1}.pth"), last_accuracy(log)


def main(argv=None):
    parser = ArgumentParser("demo", description=__doc__)
    parser.add_argument("--epochs", type=int, default=5, help="training epochs of the dense model")
    parser.add_argument("--finetune_epochs", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=5, help="seeds of the random criterion")
    parser.add_argument("--output_dir", default=os.path.join(ROOT, "demo_output"))
    args = parser.parse_args(argv)
    if min(args.epochs, args.finetune_epochs, args.seeds) < 1:
        raise UserError("--epochs, --finetune_epochs and --seeds must be >= 1")
    start = time.time()
    out = os.path.join(args.output_dir, time.strftime("%Y%m%d-%H%M%S"))
    print(f"[1/4] training ConvNeXt-T (convnext_tiny_unpruned_cifar10) on DIGITS at {INPUT_SIZE} px, "
          f"{args.epochs} epochs; results in {out}", flush=True)
    dense, dense_acc = train(os.path.join(out, "dense"), args.epochs, 2e-3,
                             ["--model", "convnext_tiny_unpruned_cifar10", "--save_ckpt", "true"])
    print(f"[2/4] comparing {', '.join(CRITERIA)} right after pruning to the 13M and 3M shapes "
          f"(random: {args.seeds} seeds)", flush=True)
    log = run(["scripts/compare_criteria.py", "--checkpoint", dense, "--output_dir", os.path.join(out, "compare"),
               "--criteria", *CRITERIA, "--budgets", "13M", "3M", "--seeds", *map(str, range(args.seeds))])
    table = [line for line in log.splitlines() if line.startswith("|")]
    print(f"[3/4] pruning to the 3M shape with {CRITERIA[0]}", flush=True)
    name, _, scoring = CRITERIA[0].partition(":")
    flags = [f"--{item.replace('=', ' ')}".split() for item in scoring.split(",") if item]
    pruned = os.path.join(out, "3M.pth")
    run(["pruning/prune.py", "--checkpoint", dense, "--output", pruned, "--criterion", name, "--dims", "32", "64",
         "128", "256", *[f for pair in flags for f in pair]])
    print(f"[4/4] fine-tuning the 3M model {args.finetune_epochs} epochs", flush=True)
    _, tuned_acc = train(os.path.join(out, "3M_finetune"), args.finetune_epochs, 1e-3,
                         ["--finetune", pruned, "--save_ckpt", "false"])
    print(f"\nDIGITS top-1 (%), {INPUT_SIZE} px, 360 test images; dense model {dense_acc:.2f}; right after "
          f"pruning, mean +- the half-width of its 95% t interval over seeds (deterministic criteria: n = 1); "
          f"vs random: the difference from random on the same seeds, * where its 95% interval excludes 0\n")
    print("\n".join(table))
    print(f"\n3M with {CRITERIA[0]}, fine-tuned {args.finetune_epochs} epochs (one run): {tuned_acc:.2f}")
    print(f"\ndemo finished in {time.time() - start:.0f} s; checkpoints, results.jsonl and accuracy.png in {out}")


if __name__ == "__main__":
    sys.exit(run_cli(main))

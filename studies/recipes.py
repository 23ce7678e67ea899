"""The seeds' pipelines as data (train -> prune -> fine-tune -> iterate -> distil), with their
published hyper-parameters and results, and the runner behind scripts/reproduce.py.

A recipe is a list of steps. Each step runs one existing tool and lands in the output folder:
`train` is main.py (a folder `<step>/`; started from the step it names with --finetune, or
from scratch), `prune` is pruning/prune.py (`<step>.pth`) then main.py --eval of the result,
`ensemble` is the top-1 of the mean softmax of several steps' models (in this process).
Every finished step is one fsynced line of `results.jsonl` (pruning/study.Results); a rerun
skips those, and a killed training resumes from its last epoch (main.py --auto_resume).
"""
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field

from common.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OFFICIAL_TINY_1K = "https://dl.fbaipublicfiles.com/convnext/convnext_tiny_1k_224_ema.pth"
CIFAR = ("CIFAR10", "CIFAR100")
# the seeds' CIFAR recipe around the flags each step sets: SGD, no mixing, no RandAugment,
# the pad-4 random crop and flip of main.py at 32 px
SGD = ("--opt", "sgd", "--momentum", "0.9", "--weight_decay", "1e-4", "--min_lr", "0", "--warmup_epochs", "0",
       "--mixup", "0", "--cutmix", "0", "--reprob", "0", "--aa", "none", "--smoothing", "0",
       "--color_jitter", "0", "--drop_path", "0")
# Li et al.'s sensitive layers, left whole: conv layers 16, 20, 38, 54 (ResNet-56) and 36, 38,
# 74 (ResNet-110), counted from the stem, are these blocks' conv1
PFEC_SKIP = {56: ("layer1.7", "layer2.0", "layer3.0", "layer3.8"), 110: ("layer1.17", "layer2.0", "layer3.0")}


@dataclass(frozen=True)
class Step:
    """One tool run of a recipe.

    Attributes:
        name: its file / folder name in the output folder and its key in results.jsonl.
        kind: "train", "prune" or "ensemble".
        argv: the tool's flags (train: the main.py recipe incl. --epochs; prune: the rule).
        source: the step whose model it starts from (train: --finetune; prune: --checkpoint).
        epochs: training epochs (the progress estimate weighs steps by them).
        members: ensemble: the steps averaged; train: the teachers it is distilled from.
        label: its row in the final table (None: no row).
        published: data set -> (params, top-1) as the seed's README reports them.
    """
    name: str
    kind: str
    argv: tuple = ()
    source: str | None = None
    epochs: int = 0
    members: tuple = ()
    label: str | None = None
    published: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Recipe:
    """A seed's pipeline: its steps and where they run."""
    name: str
    seed: str           # the system whose README it reproduces
    data_sets: tuple    # data sets the seed published (others run, without seed numbers)
    input_size: int
    steps: tuple


def _schedule(epochs, decays, quick):
    """--epochs and the seed's step drops (quick: one epoch, the cosine default)."""
    if quick:
        return ("--epochs", "1")
    return ("--epochs", str(epochs), "--sched", "multistep", "--decay_epochs", *map(str, decays))


def _train(name, epochs, decays, quick, extra, source=None, label=None, published=None, members=()):
    argv = _schedule(epochs, decays, quick) + tuple(extra)
    return Step(name, "train", argv, source, 1 if quick else epochs, tuple(members), label, published or {})


def _sgd(batch, lr, quick):
    """The seed's SGD recipe; quick: batch 16 at lr 0.02 (90 steps learn something in 1 epoch)."""
    return SGD + ("--batch_size", "16" if quick else str(batch), "--lr", "0.02" if quick else str(lr))


def _pfec_rule(depth):
    stages = ("layer1.*=0.1", "layer2.*=0.2", "layer3.*=0.3")
    return ("--criterion", "l1", "--group_ratio", *stages, *(f"{g}=0" for g in PFEC_SKIP[depth]))


def _pfec_resnet(depth, quick, published):
    """Pruning Filters: baseline 300 epochs (x0.1 at 150, 225), one l1 cut, 40 epochs (x0.1 at 20, 30)."""
    base, pruned = published
    return (_train("baseline", 300, (150, 225), quick, ("--model", f"resnet{depth}", *_sgd(128, 0.1, quick)),
                   label=f"ResNet-{depth}", published=base),
            Step("pruned", "prune", _pfec_rule(depth), "baseline", label=f"ResNet-{depth} pruned, not fine-tuned"),
            _train("finetuned", 40, (20, 30), quick, _sgd(128, 0.1, quick), "pruned",
                   f"ResNet-{depth} #1 (pruned, fine-tuned)", pruned))


def _pfec_vgg16(quick):
    rule = ("--criterion", "l1", "--group_ratio", "conv1_1=0.25", "conv4_*=0.25", "conv5_*=0.25")
    return (_train("baseline", 300, (150, 225), quick, ("--model", "vgg16_cifar", *_sgd(128, 0.1, quick)),
                   label="VGG-16"),
            Step("pruned", "prune", rule, "baseline", label="VGG-16 pruned, not fine-tuned"),
            _train("finetuned", 40, (20, 30), quick, _sgd(128, 0.1, quick), "pruned", "VGG-16 pruned, fine-tuned"))


R56_ROUNDS = ({"CIFAR10": ("0.65M", 93.05), "CIFAR100": ("0.65M", 70.69)},
              {"CIFAR10": ("0.51M", 93.21), "CIFAR100": ("0.51M", 70.56)},
              {"CIFAR10": ("0.42M", 93.06), "CIFAR100": ("0.42M", 70.30)},
              {"CIFAR10": ("0.34M", 92.95), "CIFAR100": ("0.34M", 69.57)},
              {"CIFAR10": ("0.28M", 92.56), "CIFAR100": ("0.28M", 69.98)})
R56_BASE = {"CIFAR10": ("0.85M", 93.42), "CIFAR100": ("0.85M", 71.07)}


def _pfec_iterative(quick):
    """Five l1 rounds of 40-epoch fine-tunes, the ensemble E-1-5, #5 distilled from it at T = 5."""
    steps = [_train("baseline", 300, (150, 225), quick, ("--model", "resnet56", *_sgd(128, 0.1, quick)),
                    label="ResNet-56", published=R56_BASE)]
    last = "baseline"
    for r, published in enumerate(R56_ROUNDS, start=1):
        steps.append(Step(f"round{r}_pruned", "prune", _pfec_rule(56), last))
        steps.append(_train(f"round{r}", 40, (20, 30), quick, _sgd(128, 0.1, quick), f"round{r}_pruned",
                            f"ResNet-56 #{r}", published))
        last = f"round{r}"
    rounds = tuple(f"round{r}" for r in range(1, 6))
    steps.append(Step("ensemble_e15", "ensemble", members=rounds, label="ResNet-56-E-1-5 (ensemble)",
                      published={"CIFAR10": ("-", 94.27), "CIFAR100": ("-", 74.25)}))
    steps.append(_train("distilled", 40, (20, 30), quick,
                        _sgd(128, 0.1, quick) + ("--kd_alpha", "1", "--kd_temperature", "5"), "round5",
                        "ResNet-56 #5 distilled from E-1-5 (T = 5)", {"CIFAR10": ("0.28M", 93.36)}, rounds))
    return tuple(steps)


def _slimming(quick):
    """Network Slimming: baseline and sparsity training (160 epochs, x0.1 at 80, 120), a 70%
    global BN-scale threshold, 40 epochs of fine-tuning (x0.1 at 20, 30)."""
    model = ("--model", "vgg19_bn_cifar")
    return (_train("baseline", 160, (80, 120), quick, model + _sgd(64, 0.1, quick), label="VGG-19-BN baseline",
                   published={"CIFAR10": ("20.04M", 93.62)}),
            _train("sparsity", 160, (80, 120), quick, model + _sgd(64, 0.1, quick) + ("--sparsity", "1e-4"),
                   label="trained with sparsity 1e-4", published={"CIFAR10": ("20.04M", 93.77)}),
            Step("pruned", "prune", ("--criterion", "slimming", "--ratio", "0.7", "--normalize", "none"),
                 "sparsity", label="pruned 0.7, not fine-tuned", published={"CIFAR10": ("2.42M", 10.00)}),
            _train("finetuned", 40, (20, 30), quick, _sgd(64, 0.1, quick), "pruned", "fine-tuned",
                   {"CIFAR10": ("2.42M", 93.56)}))


EFFICIENT = {"dense": ([96, 192, 384, 768], {"CIFAR10": ("28M", 95.70), "TINY_IMAGENET": ("28M", 78.17)}),
             "21M": ([96, 192, 384, 576], {"CIFAR10": ("21M", 95.06), "TINY_IMAGENET": ("21M", 75.41)}),
             "16M": ([96, 192, 384, 384], {"CIFAR10": ("16M", 95.03), "TINY_IMAGENET": ("16M", 73.94)}),
             "13M": ([96, 192, 384, 192], {"CIFAR10": ("13M", 95.13), "TINY_IMAGENET": ("13M", 73.09)}),
             "3M": ([32, 64, 128, 256], {"CIFAR10": ("3M", 90.24), "TINY_IMAGENET": ("3M", 59.94)})}


def _efficient(quick, data_set, pretrained):
    """Efficient ConvNeXt-T: ConvNeXt-T fine-tuned from ImageNet-1K weights (TRAINING.md step
    1), pruned with opnorm to each published shape, each fine-tuned (step 2). Quick: from
    scratch at 32 px, no download."""
    head = "tinyimagenet" if data_set == "TINY_IMAGENET" else "cifar10"
    adamw = ("--batch_size", "128", "--update_freq", "1" if quick else "4", "--min_lr", "1e-6",
             "--weight_decay", "0.05", "--mixup", "0", "--cutmix", "0", "--use_amp", "false" if quick else "true")
    if quick:
        dense = ("--model", f"convnext_tiny_unpruned_{head}", "--lr", "2e-3", "--warmup_epochs", "0", "--aa", "none",
                 "--reprob", "0", "--smoothing", "0", "--drop_path", "0", *adamw)
    else:
        dense = ("--model", f"convnext_tiny_unpruned_{head}", "--finetune", pretrained, "--drop_path", "0.1",
                 "--lr", "1e-4", "--warmup_epochs", "2", "--layer_decay", "0.8", "--head_init_scale", "0.001", *adamw)
    steps = [Step("dense", "train", ("--epochs", "1" if quick else "30", *dense), epochs=1 if quick else 30,
                  label="ConvNeXt-T (unpruned)", published=EFFICIENT["dense"][1])]
    tune = ("--drop_path", "0" if quick else "0.1", "--lr", "2e-3" if quick else "1e-4", "--warmup_epochs", "0",
            *(("--aa", "none", "--reprob", "0", "--smoothing", "0") if quick else ()), *adamw)
    for budget, (dims, published) in list(EFFICIENT.items())[1:]:
        steps.append(Step(f"pruned_{budget}", "prune", ("--criterion", "opnorm", "--dims", *map(str, dims)), "dense"))
        steps.append(Step(f"finetuned_{budget}", "train", ("--epochs", "1" if quick else "30", *tune),
                          f"pruned_{budget}", 1 if quick else 30, (), f"{budget} (opnorm, fine-tuned)", published))
    return tuple(steps)


RECIPES = {
    "pfec_resnet56": ("Pruning Filters for Efficient ConvNets", CIFAR, 32),
    "pfec_resnet110": ("Pruning Filters for Efficient ConvNets", CIFAR, 32),
    "pfec_vgg16": ("Pruning Filters for Efficient ConvNets", CIFAR, 32),
    "pfec_resnet56_iterative_e15": ("Pruning Filters for Efficient ConvNets", CIFAR, 32),
    "slimming_vgg19": ("Network Slimming", ("CIFAR10",), 32),
    "efficient_convnext_t": ("Efficient ConvNeXt", ("CIFAR10", "TINY_IMAGENET"), 224),
}


def recipe(name, data_set, quick=False, pretrained=OFFICIAL_TINY_1K):
    """The Recipe `name` for a data set (quick: 1-epoch steps for DIGITS, CIFAR nets at 16 px
    with batch 16)."""
    if name not in RECIPES:
        raise UserError(f"unknown recipe {name!r}; known: {', '.join(RECIPES)}")
    seed, data_sets, size = RECIPES[name]
    builders = {
        "pfec_resnet56": lambda: _pfec_resnet(56, quick, (R56_BASE, R56_ROUNDS[0])),
        "pfec_resnet110": lambda: _pfec_resnet(110, quick, ({"CIFAR10": ("1.72M", 94.01), "CIFAR100": ("1.72M", 72.35)},
                                                            {"CIFAR10": ("1.26M", 93.41), "CIFAR100": ("1.26M", 71.39)})),
        "pfec_vgg16": lambda: _pfec_vgg16(quick),
        "pfec_resnet56_iterative_e15": lambda: _pfec_iterative(quick),
        "slimming_vgg19": lambda: _slimming(quick),
        "efficient_convnext_t": lambda: _efficient(quick, data_set, pretrained),
    }
    if quick:  # the 8x8 digits: CIFAR nets run at 16 px (4x cheaper); ConvNeXt needs 32
        size = 32 if name == "efficient_convnext_t" else 16
    return Recipe(name, seed, data_sets, size, builders[name]())


# ----------------------------------------------------------------------------- the runner

@dataclass
class Pipeline:
    """A recipe bound to data and a folder: the commands of its steps and their results.

    Attributes:
        recipe: what to run.
        data_set, data_path: main.py's data flags (data_path None: DIGITS, bundled).
        output_dir: the pipeline folder (created; rerun the same command to resume).
        gpus: processes per training step (torchrun when > 1); the seed's total batch is
            split between them.
        quick: 1-epoch steps (the settings record it).
    """
    recipe: Recipe
    data_set: str
    data_path: str | None
    output_dir: str
    gpus: int = 1
    quick: bool = False

    def step(self, name):
        return next(s for s in self.recipe.steps if s.name == name)

    def model_of(self, name):
        """The checkpoint a step leaves: a training's last epoch, a pruning's output."""
        step = self.step(name)
        if step.kind == "train":
            return os.path.join(self.output_dir, name, f"checkpoint-{step.epochs - 1}.pth")
        return os.path.join(self.output_dir, f"{name}.pth")

    def _data(self):
        return ["--data_set", self.data_set, *(["--data_path", self.data_path] if self.data_path else []),
                "--input_size", str(self.recipe.input_size), *(["--num_workers", "0"] if self.quick else [])]

    def commands(self, step):
        """The argv lists a step runs (an ensemble runs in this process: none)."""
        main_py = os.path.join(ROOT, "main.py")
        if step.kind == "prune":
            pruned = self.model_of(step.name)
            return [[sys.executable, os.path.join(ROOT, "pruning", "prune.py"), "--checkpoint",
                     self.model_of(step.source), "--output", pruned, *step.argv],
                    [sys.executable, main_py, "--eval", "true", "--resume", pruned, *self._data()]]
        if step.kind != "train":
            return []
        launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                     str(self.gpus)] if self.gpus > 1 else [sys.executable])
        argv = list(step.argv)
        i = argv.index("--batch_size") + 1
        argv[i] = str(int(argv[i]) // self.gpus)  # the seed's batch, split between the processes
        return [[*launcher, main_py, *argv, *self._data(), "--output_dir", os.path.join(self.output_dir, step.name),
                 *(["--finetune", self.model_of(step.source)] if step.source else []),
                 *(["--teacher", *map(self.model_of, step.members)] if step.members else [])]]

    def check(self):
        """Refuse a --gpus the seed's batch cannot be split by."""
        for step in self.recipe.steps:
            if step.kind == "train":
                batch = int(step.argv[list(step.argv).index("--batch_size") + 1])
                if batch % self.gpus:
                    raise UserError(f"--gpus {self.gpus} does not divide step {step.name}'s batch of "
                                    f"{batch} (the seed's total batch is kept)")


def _run(argv, log_path, what):
    """Run one tool with its output in `log_path`; its stdout, or one line when it fails."""
    from studies.study import die_with_parent
    proc = subprocess.run(argv, capture_output=True, text=True, preexec_fn=die_with_parent)
    with open(log_path, "a", encoding="utf-8") as f:
        f.write(f"$ {shlex.join(argv)}\n{proc.stdout}{proc.stderr}\n")
    if proc.returncode != 0:
        lines = [line for line in (proc.stderr or proc.stdout).strip().splitlines() if line.strip()]
        raise UserError(f"{what} failed ({lines[-1] if lines else 'no output'}); its log: {log_path}")
    return proc.stdout


def _size(path, input_size):
    import models
    from checkpoints.io import load_checkpoint_file
    return models.count_arch(load_checkpoint_file(path, mmap=True)["arch"], input_size)


def _ensemble_top1(paths, data_args):
    """Top-1 of the mean softmax of several checkpoints' models on the evaluation split."""
    import torch
    from engine import evaluate
    from training.losses import load_teachers
    from studies.study import Evaluator

    class Mean(torch.nn.Module):
        def __init__(self, members):
            super().__init__()
            self.members = torch.nn.ModuleList(members)

        def forward(self, x):  # log of the mean probability: top-1 and loss of the ensemble
            return torch.stack([m(x).float().softmax(-1) for m in self.members]).mean(0).log()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    evaluator = Evaluator(data_args)
    return evaluate(evaluator.batches, Mean(load_teachers(paths, device)).eval(), device, print_freq=10 ** 9)["acc1"]


def run_step(pipe, step, log_path):
    """Run one step; its results row (params, MACs, top-1, output)."""
    size = pipe.recipe.input_size
    if step.kind == "ensemble":
        import datasets
        data = datasets.default_data_args(input_size=size, data_set=pipe.data_set, data_path=pipe.data_path)
        members = [pipe.model_of(m) for m in step.members]
        sizes = [_size(p, size) for p in members]
        return {"params": sum(p for p, _ in sizes), "macs": sum(m for _, m in sizes),
                "acc": _ensemble_top1(members, data), "snapshot": ",".join(members)}
    commands = pipe.commands(step)
    if step.kind == "prune" and os.path.exists(pipe.model_of(step.name)):
        commands = commands[1:]  # written (atomically) before a kill: only the evaluation is left
    out = ""
    for argv in commands:
        out = _run(argv, log_path, f"step {step.name}")
    path = pipe.model_of(step.name)
    if step.kind == "prune":
        found = re.findall(r"^\* Acc@1 ([\d.]+)", out, re.M)
        if not found:
            raise UserError(f"step {step.name}: the evaluation printed no top-1; its log: {log_path}")
        acc = float(found[-1])
    else:
        from studies.study import last_top1
        acc = last_top1(os.path.dirname(path))
    params, macs = _size(path, size)
    return {"params": params, "macs": macs, "acc": acc, "snapshot": path}


def _eta(pipe, rows, remaining):
    """About how long the steps left take, from the seconds per epoch / per step so far."""
    trained = [(r["seconds"], pipe.step(r["step"]).epochs) for r in rows if pipe.step(r["step"]).kind == "train"]
    other = [r["seconds"] for r in rows if pipe.step(r["step"]).kind != "train"]
    epochs = sum(s.epochs for s in remaining if s.kind == "train")
    if epochs and not trained:
        return "ETA after the first training step"
    per_epoch = sum(t for t, _ in trained) / max(sum(e for _, e in trained), 1)
    per_step = sum(other) / len(other) if other else 0.0
    seconds = epochs * per_epoch + per_step * sum(1 for s in remaining if s.kind != "train")
    return f"ETA about {_clock(seconds)}"


def _clock(seconds):
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def run(pipe, settings, say=print):
    """Run every step not finished yet, in order; the results rows (one per step)."""
    from studies.study import Results
    pipe.check()
    os.makedirs(pipe.output_dir, exist_ok=True)
    results = Results(pipe.output_dir, settings, ("step",), ("step", "params", "macs", "acc", "seconds", "snapshot"))
    os.makedirs(os.path.join(pipe.output_dir, "logs"), exist_ok=True)
    steps, start = pipe.recipe.steps, time.time()
    for k, step in enumerate(steps, start=1):
        if results.has(step=step.name):
            continue
        todo = [s for s in steps if not results.has(step=s.name)]
        what = f"{step.kind}, {step.epochs} epoch{'s' * (step.epochs != 1)}" if step.kind == "train" else step.kind
        say(f"[{k}/{len(steps)}] {step.name} ({what}): started; elapsed {_clock(time.time() - start)}, "
            f"{_eta(pipe, results.rows, todo)}", flush=True)
        began = time.time()
        row = run_step(pipe, step, os.path.join(pipe.output_dir, "logs", f"{step.name}.log"))
        results.add({"step": step.name, **row, "seconds": round(time.time() - began, 1)})
        say(f"[{k}/{len(steps)}] {step.name}: top-1 {row['acc']:.2f}, {row['params'] / 1e6:.2f}M params, "
            f"{time.time() - began:.0f} s", flush=True)
    return results.rows


def table(pipe, rows):
    """The final table, laid out like the seed's README table, beside the seed's numbers."""
    shown = pipe.data_set if pipe.data_set in pipe.recipe.data_sets else pipe.recipe.data_sets[0]
    note = "" if shown == pipe.data_set else f" ({shown}: not this data)"
    lines = [f"| {pipe.recipe.seed}: {pipe.recipe.name} on {pipe.data_set} | epochs | params | MACs @ {pipe.recipe.input_size} px | top-1 | "
             f"seed params{note} | seed top-1{note} |", "|---|---:|---:|---:|---:|---:|---:|"]
    by_step = {r["step"]: r for r in rows}
    for step in pipe.recipe.steps:
        if step.label is None or step.name not in by_step:
            continue
        r = by_step[step.name]
        params, acc = step.published.get(shown, ("-", None))
        lines.append(f"| {step.label} | {step.epochs or '-'} | {r['params'] / 1e6:.2f}M | {r['macs'] / 1e6:.1f}M | {r['acc']:.2f} | "
                     f"{params} | {'-' if acc is None else f'{acc:.2f}'} |")
    return "\n".join(lines)

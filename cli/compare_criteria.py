#!/usr/bin/env python
"""Compare pruning criteria on one checkpoint: criteria x budgets x seeds, with spread and a plot.

    python scripts/compare_criteria.py --checkpoint dense.pth --output_dir cmp \\
        --criteria opnorm l1 l2:scope=group,normalize=mean taylor random --budgets 13M 3M --seeds 0 1 2 3 4

A criterion is a name of pruning/criteria.py, optionally with prune.py scoring flags:
`l2:scope=group,normalize=mean` is `--criterion l2 --scope group --normalize mean`.
A budget is a named shape of the family (ConvNeXt-T: 21M, 16M, 13M, 3M), `dims=32,64,128,256`,
`params=0.25` / `macs=0.25` (that share of the source's params / MACs, global ranking),
`ratio=0.5` (that share of all channels, global ranking), depth: `depths=3,3,5,3` (blocks kept
per stage) or `blocks=4` (remove 4), or latency: `speedup=3` / `latency=MS` (measured here;
`+latency_batch=16`, `+latency_backend=onnxruntime`, `+prune_depth` to plan depth with it).
Parts join with '+': `13M+depths=3,3,5,3`, `speedup=3+prune_depth+latency_batch=16`. Seeded criteria (random, the
data-driven ones, whose calibration batches the seed draws, and any with compensate=stats|refit,
whose fit images it draws) run once per seed; deterministic ones once, unless --finetune_epochs fine-tunes every cell with each seed (main.py --seed).

Accuracy right after pruning is measured on the evaluation split (or a fixed --eval_subset);
with --finetune_epochs K each pruned model is also fine-tuned by main.py, and --controls
scratch_e scratch_b add the pruned shapes trained from fresh weights (K epochs; or as many as
match the dense training plus the fine-tuning in MACs x epochs). The table gives each cell's
mean with its 95% t interval and the paired difference from random on the same seeds.
Writes results.jsonl (one row per cell), summary.csv / summary.json (mean, sample standard
deviation, min, max, intervals per criterion and budget) and accuracy.png (accuracy against
params or MACs, one line per criterion, the random criterion's mean +- 1 SD shaded) into
--output_dir. Rerun the same command after a kill: finished cells are kept, the rest run.
--launcher slurm runs every cell as a submitit job (pruning/dispatch.py).
"""
import math
import os
import sys
import time
from types import SimpleNamespace


from cli.flags import DATA_SETS
from cli.options import main_flags
from common.errors import UserError, parse_first, run_cli

from pruning.rules import budgets
from studies import dispatch


CONTROLS = ("scratch_e", "scratch_b")


def get_args_parser():
    p = dispatch.study_parser("compare_criteria", __doc__)
    p.add_argument("--criteria", nargs="+", default=["opnorm", "l1", "l2", "fpgm", "random"],
                   help="criteria, each NAME or NAME:flag=value,...")
    p.add_argument("--budgets", nargs="+", default=["13M", "3M"], help="named shapes or KIND=VALUE")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4], help="seeds of the seeded cells")
    p.add_argument("--data_set", default=None, choices=DATA_SETS,
                   help="evaluation (and calibration) data (default: the checkpoint's)")
    p.add_argument("--data_path", default=None, help="its folder (default: the checkpoint's)")
    p.add_argument("--eval_subset", type=int, default=None,
                   help="evaluate on this many images of the split (a fixed choice); default all")
    p.add_argument("--finetune_epochs", type=int, default=0,
                   help="also fine-tune every pruned model this many epochs with main.py")
    p.add_argument("--train_args", default="",
                   help="extra main.py flags of the fine-tuning, one quoted string")
    p.add_argument("--controls", nargs="+", default=[], choices=CONTROLS,
                   help="per budget and seed, the pruned shape trained from fresh weights: scratch_e for "
                        "--finetune_epochs epochs, scratch_b for as many as match the dense training plus "
                        "the fine-tuning in MACs x epochs (Liu et al., 2019)")
    p.add_argument("--x", default="params", choices=["params", "macs"], help="the plot's x axis")
    dispatch.add_flags(p)
    return p


if __name__ == "__main__":
    parse_first(get_args_parser)  # --help and flag errors before torch loads

import models  # noqa: E402
from checkpoints.io import save_checkpoint_file  # noqa: E402
import torch  # noqa: E402
from studies import stats, study  # noqa: E402


# study budget parts beyond the registered budgets: KIND=VALUE -> prune.py flag
RULE_PARTS = {"dims": "--dims", "depths": "--depths", "blocks": "--remove_blocks", "speedup": "--target_speedup",
              "latency": "--target_latency", "latency_batch": "--latency_batch", "latency_backend": "--latency_backend"}


def budget_argv(spec, arch, input_size):
    """A budget -> prune.py keep-rule flags: parts joined by '+', each a named shape, dims=A,B,..,
    depths=A,B,.. (blocks per stage), blocks=N (remove N), speedup=X / latency=MS (measured on this
    machine; latency_batch=B, latency_backend=NAME), prune_depth (plan depth with the latency
    target), or SHORT=S for a registered budget (pruning/rules.py) with a study form, S a share
    in (0, 1)."""
    return [flag for part in spec.split("+") for flag in _part_argv(part, spec, arch, input_size)]


def _part_argv(part, spec, arch, input_size):
    named = models.named_dims(arch)
    if part in named:
        return ["--dims", *map(str, named[part])]
    if part == "prune_depth":
        return ["--prune_depth", "true"]
    shares = {b.short: b for b in budgets() if b.short}
    kind, sep, value = part.partition("=")
    if not sep or not value or kind not in (*RULE_PARTS, *shares):
        known = ", ".join(named) or "none for this model"
        raise UserError(f"budget {spec!r}: give a named shape ({known}), dims=A,B,.., depths=A,B,.., blocks=N, "
                        "speedup=X, latency=MS (with +prune_depth, +latency_batch=B), or "
                        + ", ".join(f"{k}=S" for k in shares))
    if kind in RULE_PARTS:
        return [RULE_PARTS[kind], *value.split(",")]
    try:
        share = float(value)
    except ValueError:
        raise UserError(f"budget {spec!r}: {value!r} is not a number") from None
    if not 0 < share < 1:
        raise UserError(f"budget {spec!r}: the share must be in (0, 1)")
    budget = shares[kind]
    return [f"--{budget.name}", str(budget.from_share(share, arch, input_size))]


def plan_cells(args, source):
    """[(row key, cell)] of every criterion, budget and seed, and of every control; checked
    before any work. A control trains the shape the first criterion gives at its budget and
    seed (for a named shape, every criterion's) from fresh weights."""
    cells = []
    criteria = [(crit, study.criterion_argv(crit)) for crit in args.criteria]
    budgets = [(budget, budget_argv(budget, source.arch, args.input_size)) for budget in args.budgets]

    def spec(c_argv, b_argv, seed):
        return study.cell_spec(args.checkpoint, c_argv + b_argv + study.seed_flags(c_argv, seed)
                               + ["--input_size", str(args.input_size)]
                               + study.calibration_flags(c_argv, args.data_set, args.data_path))

    for crit, c_argv in criteria:
        seeds = args.seeds if (study.uses_seed(c_argv) or args.finetune_epochs) else args.seeds[:1]
        for seed in seeds:  # seeds outside budgets: each seed's calibration is measured once
            for budget, b_argv in budgets:
                cells.append(({"criterion": crit, "budget": budget, "seed": seed},
                              {"kind": "prune", "spec": spec(c_argv, b_argv, seed)}))
    for control in args.controls:
        for seed in args.seeds:
            for budget, b_argv in budgets:
                cells.append(({"criterion": control, "budget": budget, "seed": seed},
                              {"kind": control, "spec": spec(criteria[0][1], b_argv, seed)}))
    return cells


def check_args(args):
    study.check_common(args)
    dispatch.check_flags(args)
    if args.finetune_epochs < 0:
        raise UserError(f"--finetune_epochs must be >= 0, got {args.finetune_epochs}")
    if args.train_args and not args.finetune_epochs:
        raise UserError("--train_args is used only with --finetune_epochs")
    if args.controls and not args.finetune_epochs:
        raise UserError("--controls train the pruned shapes from scratch for as long as the fine-tuning: "
                        "give --finetune_epochs")
    study.check_train_args(args.train_args, main_flags())
    for flag in ("criteria", "budgets", "controls"):
        values = getattr(args, flag)
        if len(set(values)) != len(values):
            raise UserError(f"--{flag} lists a value twice")
    if set(args.criteria) & set(CONTROLS):
        raise UserError(f"{', '.join(CONTROLS)} are controls: give them with --controls")


def cell_name(key):
    crit, budget = key["criterion"], key["budget"]
    return f"{crit.replace(':', '_').replace(',', '_').replace('=', '-')}_{budget.replace('=', '-')}_seed{key['seed']}"


def finetune(args, name, start_ckpt, seed, epochs, sub="finetune"):
    """main.py fine-tuning (or from-scratch training) of one checkpoint (auto-resumed after a
    kill) in the study folder; its last top-1."""
    path = os.path.join(args.output_dir, "pruned" if sub == "finetune" else "scratch", f"{name}.pth")
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_checkpoint_file(start_ckpt, path)
    return study.finetune(path, os.path.join(args.output_dir, sub, name), epochs, args.data, args.train_args,
                          f"{sub} {name}", extra=["--seed", str(seed)],
                          launcher=dispatch.torchrun(args.gpus_per_cell))[1]


def scratch_b_epochs(args, source, macs):
    """Scratch-B: epochs of the small shape whose MACs x epochs equal the dense model's
    training (its recorded epochs) plus the fine-tuning: ceil((M_dense E_dense + M E_ft) / M)."""
    dense_epochs = source.held.trained_epochs
    if dense_epochs is None:
        raise UserError(f"--controls scratch_b: {args.checkpoint} records no training epochs (no 'epoch'), "
                        "so its training compute cannot be matched")
    dense_macs = models.count_arch(source.arch, args.input_size)[1]
    return math.ceil((dense_macs * dense_epochs + macs * args.finetune_epochs) / macs)


def context(args):
    """What every cell reads: the source (opened once), the evaluation images, calibrations."""
    source, _ = study.open_source(args.checkpoint)
    return SimpleNamespace(source=source, evaluator=study.Evaluator(args.data, args.eval_subset), evidence={})


def compute(ctx, args, cell_and_key):
    """One cell's row: prune, evaluate, fine-tune; or a control trained from fresh weights."""
    key, cell = cell_and_key
    start, seed = time.time(), key["seed"]
    pruned = study.prune_cell(ctx.source, cell["spec"], ctx.evidence)
    params, macs = models.count_arch(pruned["arch"], args.input_size)
    if cell["kind"] == "prune":
        acc = ctx.evaluator.accuracy(pruned["arch"], pruned["model"])
        tuned = finetune(args, cell_name(key), pruned, seed, args.finetune_epochs) if args.finetune_epochs else None
    else:  # the same shape from the family's own initialisation, seeded
        torch.manual_seed(seed)
        fresh = {"model": models.build_model(pruned["arch"]).state_dict(), "arch": pruned["arch"]}
        epochs = args.finetune_epochs if cell["kind"] == "scratch_e" else scratch_b_epochs(args, ctx.source, macs)
        acc, tuned = None, finetune(args, cell_name(key), fresh, seed, epochs, sub="scratch")
    return {**key, "params": params, "macs": macs, "acc_pruned": acc, "acc_finetuned": tuned,
            "seconds": round(time.time() - start, 2)}


def say(n, total, row):
    after = "" if row["acc_pruned"] is None else f"top-1 {row['acc_pruned']:.2f} right after pruning"
    tuned = "" if row["acc_finetuned"] is None else f"{', ' if after else ''}trained {row['acc_finetuned']:.2f}"
    print(f"[{n}/{total}] {row['criterion']} at {row['budget']}, seed {row['seed']}: {after}{tuned} "
          f"({row['params'] / 1e6:.2f}M params, {row['macs'] / 1e6:.1f}M MACs)", flush=True)


def _by_seed(rows, key, seeds):
    """seed -> value; a criterion that ran once (deterministic, not fine-tuned) stands for every seed."""
    values = {r["seed"]: r[key] for r in rows if r[key] is not None}
    if len(values) == 1 and len(rows) == 1:
        return {s: next(iter(values.values())) for s in seeds}
    return values


def summarise(args, results, source_acc):
    """One row per criterion (and control) and budget, in the order given: mean, SD, min, max,
    the 95% t interval of the mean, and the paired difference against random on the same seeds."""
    reference = next((c for c in args.criteria if c.split(":")[0] == "random"), None)
    rows = []
    for budget in args.budgets:
        ref = [r for r in results.rows if r["criterion"] == reference and r["budget"] == budget]
        for crit in list(args.criteria) + list(args.controls):
            cell = [r for r in results.rows if r["criterion"] == crit and r["budget"] == budget]
            if not cell:
                continue
            row = {"criterion": crit, "budget": budget, "n": len(cell),
                   "params": round(study.mean_sd([r["params"] for r in cell])[0]),
                   "macs": round(study.mean_sd([r["macs"] for r in cell])[0])}
            for key in ("acc_pruned", "acc_finetuned"):
                values = [r[key] for r in cell if r[key] is not None]
                if not values:
                    continue
                mean, sd, _ = study.mean_sd(values)
                ci = stats.mean_interval(values)
                row.update({f"{key}_mean": mean, f"{key}_sd": sd, f"{key}_min": min(values),
                            f"{key}_max": max(values), f"{key}_ci": ci.half})
                if ref and crit != reference:
                    diff = stats.paired_difference(_by_seed(cell, key, args.seeds), _by_seed(ref, key, args.seeds))
                    if diff is not None:
                        row.update({f"{key}_vs_random": diff.mean, f"{key}_vs_random_ci": diff.half,
                                    f"{key}_vs_random_n": diff.n, f"{key}_vs_random_excludes_0": diff.excludes_zero})
            rows.append(row)
    return {"source_acc1": source_acc, "reference": reference, "rows": rows}


def _interval(r, key):
    if f"{key}_mean" not in r:
        return "-"
    half = r.get(f"{key}_ci")
    return f"{r[f'{key}_mean']:.2f}" + (f" +- {half:.2f}" if half is not None else "")


def _versus(r, key):
    if f"{key}_vs_random" not in r:
        return "-"
    half = r[f"{key}_vs_random_ci"]
    text = f"{r[f'{key}_vs_random']:+.2f}" + (f" +- {half:.2f}" if half is not None else "")
    return text + (" *" if r[f"{key}_vs_random_excludes_0"] else "")


def print_table(summary, images):
    print(f"\ntop-1 (%) on {images} evaluation images (source: {summary['source_acc1']:.2f}); mean +- the "
          "half-width of its 95% t interval over n seeds; 'vs random': the paired difference from "
          f"{summary['reference'] or 'random (not run)'} on the same seeds, * where its 95% interval "
          "excludes 0 (a criterion that ran once stands for every seed)\n")
    tuned = any("acc_finetuned_mean" in r for r in summary["rows"])
    head = "| budget | criterion | params | n | right after pruning | vs random |"
    print(head + (" fine-tuned / trained | vs random |" if tuned else ""))
    print("|---|---|---:|---:|---:|---:|" + ("---:|---:|" if tuned else ""))
    for r in summary["rows"]:
        line = (f"| {r['budget']} | {r['criterion']} | {r['params'] / 1e6:.2f}M | {r['n']} | "
                f"{_interval(r, 'acc_pruned')} | {_versus(r, 'acc_pruned')} |")
        if tuned:
            line += f" {_interval(r, 'acc_finetuned')} | {_versus(r, 'acc_finetuned')} |"
        print(line)


def plot(args, summary, path):
    plt = study.pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    key = args.x
    for crit in args.criteria:
        rows = sorted((r for r in summary["rows"] if r["criterion"] == crit), key=lambda r: r[key])
        x = [r[key] / 1e6 for r in rows]
        mean = [r["acc_pruned_mean"] for r in rows]
        sd = [r["acc_pruned_sd"] for r in rows]
        if crit.split(":")[0] == "random":
            ax.fill_between(x, [m - s for m, s in zip(mean, sd)], [m + s for m, s in zip(mean, sd)],
                            color="grey", alpha=0.25, label=f"{crit} mean +- 1 SD")
            ax.plot(x, mean, color="grey", linestyle="--", marker="o")
        else:
            ax.errorbar(x, mean, yerr=sd, marker="o", capsize=3, label=crit)
    study.finish_plot(plt, fig, ax, summary["source_acc1"],
                      f"{'parameters' if key == 'params' else 'MACs'} (millions)", path, fontsize=8)


def run(args):
    check_args(args)
    source, args.input_size = study.open_source(args.checkpoint)
    args.data = source.held.data_args(args.data_set, args.data_path, args.input_size)
    cells = plan_cells(args, source)
    settings = {k: getattr(args, k) for k in ("criteria", "budgets", "seeds", "data_set", "data_path",
                                              "eval_subset", "finetune_epochs", "train_args")}
    if args.controls:  # absent otherwise: folders of earlier versions resume
        settings["controls"] = args.controls
    settings.update(source_sha256=source.sha256, input_size=args.input_size)
    evaluator = study.Evaluator(args.data, args.eval_subset)  # data errors first: they leave no folder
    results = study.Results(args.output_dir, settings, ("criterion", "budget", "seed"),
                            ("criterion", "budget", "seed", "params", "macs", "acc_pruned", "acc_finetuned",
                             "seconds"))
    once = [c for c in args.criteria if not study.uses_seed(study.criterion_argv(c))]
    if once and len(args.seeds) > 1 and not args.finetune_epochs:
        print(f"deterministic criteria ({', '.join(once)}) run once per budget; the seeds apply to the "
              "seeded ones and to fine-tuning")
    print(f"{len(cells)} cells ({len(results.rows)} done before), {models.describe_arch(source.arch)}, "
          f"{evaluator.images} {args.data.data_set} evaluation images at {args.input_size} px", flush=True)
    source_acc = evaluator.accuracy(source.arch, source.sds[source.scored])
    start = time.time()
    local = SimpleNamespace(source=source, evaluator=evaluator, evidence={})
    dispatch.run_cells(args, results, [(key, (key, cell)) for key, cell in cells], context, compute, say,
                       name="compare_criteria", ctx=local)
    summary = summarise(args, results, source_acc)
    print_table(summary, evaluator.images)
    study.write_json(os.path.join(args.output_dir, "summary.json"), summary)
    header = list(dict.fromkeys(k for r in summary["rows"] for k in r))
    study.write_table(os.path.join(args.output_dir, "summary.csv"), header,
                      [[r.get(k) for k in header] for r in summary["rows"]])
    plot(args, summary, os.path.join(args.output_dir, "accuracy.png"))
    print(f"\n{time.time() - start:.0f} s; results.jsonl, summary.csv, summary.json and accuracy.png "
          f"in {args.output_dir}")


def main(argv=None):
    return run_cli(lambda argv: run(get_args_parser().parse_args(argv)), argv)


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Compare pruning criteria on one checkpoint: criteria x budgets x seeds, with spread and a plot.

    python scripts/compare_criteria.py --checkpoint dense.pth --output_dir cmp \\
        --criteria opnorm l1 l2:scope=group,normalize=mean taylor random --budgets 13M 3M --seeds 0 1 2 3 4

A criterion is a name of pruning/criteria.py, optionally with prune.py scoring flags:
`l2:scope=group,normalize=mean` is `--criterion l2 --scope group --normalize mean`.
A budget is a named shape of the family (ConvNeXt-T: 21M, 16M, 13M, 3M), `dims=32,64,128,256`,
`params=0.25` / `macs=0.25` (that share of the source's params / MACs, global ranking) or
`ratio=0.5` (that share of all channels, global ranking). Seeded criteria (random, and the
data-driven ones, whose calibration batches the seed draws) run once per seed; deterministic
ones once, unless --finetune_epochs fine-tunes every cell with each seed (main.py --seed).

Accuracy right after pruning is measured in this process on the evaluation split (or a fixed
--eval_subset); with --finetune_epochs K each pruned model is also fine-tuned by main.py.
Writes results.jsonl (one row per cell), summary.csv / summary.json (mean, sample standard
deviation, min, max per criterion and budget) and accuracy.png (accuracy against params or
MACs, one line per criterion, the random criterion's mean +- 1 SD shaded) into --output_dir.
Rerun the same command after a kill: finished cells are kept, the rest run.
"""
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import datasets  # noqa: E402
import models  # noqa: E402
from checkpoint import save_checkpoint_file  # noqa: E402
from errors import UserError, run_cli  # noqa: E402
from pruning import study  # noqa: E402


def get_args_parser():
    p = study.parser("compare_criteria", __doc__)
    p.add_argument("--criteria", nargs="+", default=["opnorm", "l1", "l2", "fpgm", "random"],
                   help="criteria, each NAME or NAME:flag=value,...")
    p.add_argument("--budgets", nargs="+", default=["13M", "3M"], help="named shapes or KIND=VALUE")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4], help="seeds of the seeded cells")
    p.add_argument("--data_set", default=None, choices=datasets.DATA_SETS,
                   help="evaluation (and calibration) data (default: the checkpoint's)")
    p.add_argument("--data_path", default=None, help="its folder (default: the checkpoint's)")
    p.add_argument("--eval_subset", type=int, default=None,
                   help="evaluate on this many images of the split (a fixed choice); default all")
    p.add_argument("--finetune_epochs", type=int, default=0,
                   help="also fine-tune every pruned model this many epochs with main.py")
    p.add_argument("--train_args", default="",
                   help="extra main.py flags of the fine-tuning, one quoted string")
    p.add_argument("--x", default="params", choices=["params", "macs"], help="the plot's x axis")
    return p


def budget_argv(spec, arch, input_size):
    """A budget -> prune.py keep-rule flags."""
    named = models.named_dims(arch)
    if spec in named:
        return ["--dims", *map(str, named[spec])]
    kind, sep, value = spec.partition("=")
    if not sep or kind not in ("dims", "params", "macs", "ratio"):
        known = ", ".join(named) or "none for this model"
        raise UserError(f"budget {spec!r}: give a named shape ({known}), dims=A,B,.., params=S, "
                        "macs=S or ratio=S")
    if kind == "dims":
        return ["--dims", *value.split(",")]
    try:
        share = float(value)
    except ValueError:
        raise UserError(f"budget {spec!r}: {value!r} is not a number") from None
    if not 0 < share < 1:
        raise UserError(f"budget {spec!r}: the share must be in (0, 1)")
    if kind == "ratio":
        return ["--ratio", value]
    params, macs = models.count_arch(arch, input_size)
    return [f"--target_{kind}", str(int(share * (params if kind == "params" else macs)))]


def plan_cells(args, source):
    """(criterion, budget, seed, prune.py settings) of every cell, checked before any work."""
    cells = []
    criteria = [(crit, study.criterion_argv(crit)) for crit in args.criteria]
    budgets = [(budget, budget_argv(budget, source.arch, args.input_size)) for budget in args.budgets]
    for crit, c_argv in criteria:
        seeds = args.seeds if (study.uses_seed(c_argv) or args.finetune_epochs) else args.seeds[:1]
        for seed in seeds:  # seeds outside budgets: each seed's calibration is measured once
            for budget, b_argv in budgets:
                spec = study.cell_spec(args.checkpoint, c_argv + b_argv + study.seed_flags(c_argv, seed)
                                       + ["--input_size", str(args.input_size)]
                                       + study.calibration_flags(c_argv, args.data_set, args.data_path))
                cells.append((crit, budget, seed, spec))
    return cells


def check_args(args):
    study.check_common(args)
    if args.finetune_epochs < 0:
        raise UserError(f"--finetune_epochs must be >= 0, got {args.finetune_epochs}")
    if args.train_args and not args.finetune_epochs:
        raise UserError("--train_args is used only with --finetune_epochs")
    study.check_train_args(args.train_args)
    for flag in ("criteria", "budgets"):
        values = getattr(args, flag)
        if len(set(values)) != len(values):
            raise UserError(f"--{flag} lists a value twice")


def finetune(args, folder, cell_name, pruned, seed):
    """main.py fine-tuning of one pruned model (auto-resumed after a kill); its last top-1."""
    path = os.path.join(folder, "pruned", f"{cell_name}.pth")
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_checkpoint_file(pruned, path)
    return study.finetune(path, os.path.join(folder, "finetune", cell_name), args.finetune_epochs, args.data,
                          args.train_args, f"fine-tuning {cell_name}", extra=["--seed", str(seed)])[1]


def run_cells(args, source, cells, results, evaluator):
    evidence = {}
    for n, (crit, budget, seed, spec) in enumerate(cells, start=1):
        if results.has(criterion=crit, budget=budget, seed=seed):
            continue
        start = time.time()
        pruned = study.prune_cell(source, spec, evidence)
        params, macs = models.count_arch(pruned["arch"], args.input_size)
        acc = evaluator.accuracy(pruned["arch"], pruned["model"])
        name = f"{crit.replace(':', '_').replace(',', '_').replace('=', '-')}_{budget.replace('=', '-')}_seed{seed}"
        tuned = finetune(args, args.output_dir, name, pruned, seed) if args.finetune_epochs else None
        results.add({"criterion": crit, "budget": budget, "seed": seed, "params": params, "macs": macs,
                     "acc_pruned": acc, "acc_finetuned": tuned, "seconds": round(time.time() - start, 2)})
        more = f", fine-tuned {tuned:.2f}" if tuned is not None else ""
        print(f"[{n}/{len(cells)}] {crit} at {budget}, seed {seed}: top-1 {acc:.2f} right after "
              f"pruning{more} ({params / 1e6:.2f}M params, {macs / 1e6:.1f}M MACs)", flush=True)


def summarise(args, results, source_acc):
    """Rows of the summary: one per criterion and budget, in the order given."""
    rows = []
    for budget in args.budgets:
        for crit in args.criteria:
            cell = [r for r in results.rows if r["criterion"] == crit and r["budget"] == budget]
            row = {"criterion": crit, "budget": budget, "n": len(cell),
                   "params": round(study.mean_sd([r["params"] for r in cell])[0]),
                   "macs": round(study.mean_sd([r["macs"] for r in cell])[0])}
            for key in ("acc_pruned", "acc_finetuned"):
                values = [r[key] for r in cell if r[key] is not None]
                if values:
                    mean, sd, _ = study.mean_sd(values)
                    row.update({f"{key}_mean": mean, f"{key}_sd": sd,
                                f"{key}_min": min(values), f"{key}_max": max(values)})
            rows.append(row)
    return {"source_acc1": source_acc, "rows": rows}


def print_table(summary, images):
    print(f"\ntop-1 (%) on {images} evaluation images (source: {summary['source_acc1']:.2f}); "
          "mean +- sample SD over n seeds\n")
    tuned = any("acc_finetuned_mean" in r for r in summary["rows"])
    head = "| budget | criterion | params | n | right after pruning | min .. max |"
    print(head + (" fine-tuned |" if tuned else ""))
    print("|---|---|---:|---:|---:|---:|" + ("---:|" if tuned else ""))
    for r in summary["rows"]:
        line = (f"| {r['budget']} | {r['criterion']} | {r['params'] / 1e6:.2f}M | {r['n']} | "
                f"{r['acc_pruned_mean']:.2f} +- {r['acc_pruned_sd']:.2f} | "
                f"{r['acc_pruned_min']:.2f} .. {r['acc_pruned_max']:.2f} |")
        if tuned:
            line += (f" {r['acc_finetuned_mean']:.2f} +- {r['acc_finetuned_sd']:.2f} |"
                     if "acc_finetuned_mean" in r else " - |")
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
    run_cells(args, source, cells, results, evaluator)
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

#!/usr/bin/env python
"""Iterative pruning: N rounds of prune -> fine-tune -> snapshot, then optionally a final
round distilled from the ensemble of the snapshots (the Pruning Filters seed's workflow).

    python pruning/iterative.py --checkpoint dense.pth --output_dir iter --rounds 3 \\
        --prune "--criterion l1 --ratio 0.2" --finetune_epochs 2 \\
        --train_args "--lr 1e-3 --batch_size 32 --warmup_epochs 0 --mixup 0 --cutmix 0" \\
        --distill_epochs 2

Each round applies the prune.py flags of --prune to the current model (round 1: --checkpoint;
then the last round's snapshot), measures top-1 right after pruning, fine-tunes with main.py
(--train_args are passed through) and keeps its last checkpoint as the round's snapshot.
--distill_epochs E then fine-tunes the last snapshot E more epochs with every snapshot as a
teacher (main.py --teacher ... --kd_alpha A --kd_temperature T). Everything lands in
--output_dir (round<r>/pruned.pth, round<r>/finetune/, distill/, results.jsonl); rerun the
same command after a kill: finished rounds are kept and a fine-tuning resumes where it stopped.
"""
import os
import sys
from types import SimpleNamespace


from cli.flags import DATA_SETS
from cli.options import main_flags
from common.errors import UserError, parse_first, run_cli
from studies import dispatch


def get_args_parser():
    p = dispatch.study_parser("iterative", __doc__)
    p.add_argument("--rounds", type=int, default=3, help="prune -> fine-tune rounds")
    p.add_argument("--prune", required=True,
                   help="prune.py flags of every round, one quoted string (e.g. \"--criterion l1 --ratio 0.2\")")
    p.add_argument("--finetune_epochs", type=int, default=2, help="main.py epochs after each pruning")
    p.add_argument("--train_args", default="", help="extra main.py flags of every fine-tuning, one quoted string")
    p.add_argument("--distill_epochs", type=int, default=0,
                   help="final round: this many epochs distilled from the ensemble of snapshots (0: none)")
    p.add_argument("--kd_alpha", type=float, default=1.0, help="weight of the distillation term (1: pure)")
    p.add_argument("--kd_temperature", type=float, default=5.0, help="distillation temperature")
    p.add_argument("--data_set", default=None, choices=DATA_SETS, help="default: the checkpoint's")
    p.add_argument("--data_path", default=None, help="its folder (default: the checkpoint's)")
    dispatch.add_flags(p)
    return p


if __name__ == "__main__":
    parse_first(get_args_parser)  # --help and flag errors before torch loads

import models  # noqa: E402
from checkpoints.io import load_checkpoint_file, save_checkpoint_file  # noqa: E402
from pruning import api  # noqa: E402
from studies import study  # noqa: E402


def check_args(args):
    study.check_common(args)
    dispatch.check_flags(args)
    if args.rounds < 1 or args.finetune_epochs < 1 or args.distill_epochs < 0:
        raise UserError("--rounds and --finetune_epochs must be >= 1, --distill_epochs >= 0")
    if not 0 <= args.kd_alpha <= 1 or args.kd_temperature <= 0:
        raise UserError("--kd_alpha must be in [0, 1] and --kd_temperature > 0")
    if not args.distill_epochs and (args.kd_alpha != 1.0 or args.kd_temperature != 5.0):
        raise UserError("--kd_alpha / --kd_temperature apply to the distillation round: give --distill_epochs")
    study.check_train_args(args.train_args, main_flags(), allowed=("--seed",))
    prune_argv = study.split_flags(args.prune, "--prune")
    for flag in ("--checkpoint", "--output", "--dry_run"):
        if flag in prune_argv:
            raise UserError(f"--prune: {flag} is set by this tool; leave it out")
    study.cell_spec(args.checkpoint, prune_argv)  # every prune.py check, up front


def finetune(args, data, start, out, epochs, teachers=()):
    """Fine-tune `start` into `out` (auto-resumed); (last checkpoint, its top-1)."""
    extra = []
    if teachers:
        extra += ["--teacher", *teachers, "--kd_alpha", str(args.kd_alpha),
                  "--kd_temperature", str(args.kd_temperature)]
    return study.finetune(start, out, epochs, data, args.train_args, "main.py", extra,
                          launcher=dispatch.torchrun(args.gpus_per_cell))


def prune_round(args, current, path):
    """Prune `current` into `path` (kept if a killed run already wrote it); the pruned dict."""
    if os.path.exists(path):
        return load_checkpoint_file(path)
    pruned = api.prune(current, study.cell_spec(current, study.split_flags(args.prune, "--prune"))).checkpoint
    save_checkpoint_file(pruned, path)
    return pruned


def print_table(rows, source_row):
    print("\n| round | params | MACs | right after pruning | after fine-tuning |")
    print("|---|---:|---:|---:|---:|")
    for r in [source_row] + rows:
        after = "-" if r["acc_pruned"] is None else f"{r['acc_pruned']:.2f}"
        print(f"| {r['round']} | {r['params'] / 1e6:.2f}M | {r['macs'] / 1e6:.1f}M | {after} | "
              f"{r['acc_finetuned']:.2f} |")


def context(args):
    return SimpleNamespace(evaluator=study.Evaluator(args.data))


def compute(ctx, args, cell):
    """One round (prune the current model, measure, fine-tune) or the distillation round."""
    r, current, snapshots = cell
    if r == "distill":
        final, tuned = finetune(args, args.data, current, os.path.join(args.output_dir, "distill"),
                                args.distill_epochs, teachers=snapshots)
        params, macs = models.count_arch(load_checkpoint_file(current, mmap=True)["arch"], args.data.input_size)
        return {"round": "distill", "params": params, "macs": macs, "acc_pruned": None, "acc_finetuned": tuned,
                "snapshot": final}
    folder = os.path.join(args.output_dir, f"round{r}")
    os.makedirs(folder, exist_ok=True)
    pruned = prune_round(args, current, os.path.join(folder, "pruned.pth"))
    params, macs = models.count_arch(pruned["arch"], args.data.input_size)
    acc = ctx.evaluator.accuracy(pruned["arch"], pruned["model"])
    print(f"[round {r}/{args.rounds}] pruned to {params / 1e6:.2f}M params: top-1 {acc:.2f}; "
          f"fine-tuning {args.finetune_epochs} epochs", flush=True)
    snapshot, tuned = finetune(args, args.data, os.path.join(folder, "pruned.pth"), os.path.join(folder, "finetune"),
                               args.finetune_epochs)
    return {"round": r, "params": params, "macs": macs, "acc_pruned": acc, "acc_finetuned": tuned,
            "snapshot": snapshot}


def say(n, total, row):
    if row["round"] == "distill":
        print(f"[distill] top-1 {row['acc_finetuned']:.2f}; {row['snapshot']}", flush=True)
    else:
        print(f"[round {row['round']}] fine-tuned: top-1 {row['acc_finetuned']:.2f}; snapshot {row['snapshot']}",
              flush=True)


def run(args):
    check_args(args)
    source, _ = study.open_source(args.checkpoint)
    data = args.data = source.held.data_args(args.data_set, args.data_path)
    settings = {k: getattr(args, k) for k in ("rounds", "prune", "finetune_epochs", "train_args",
                                              "distill_epochs", "kd_alpha", "kd_temperature", "data_set",
                                              "data_path")}
    settings["source_sha256"] = source.sha256
    local = SimpleNamespace(evaluator=study.Evaluator(data))  # before the folder: a data error leaves none
    results = study.Results(args.output_dir, settings, ("round",),
                            ("round", "params", "macs", "acc_pruned", "acc_finetuned", "snapshot"))
    params, macs = models.count_arch(source.arch, data.input_size)
    source_row = {"round": "source", "params": params, "macs": macs, "acc_pruned": None,
                  "acc_finetuned": local.evaluator.accuracy(source.arch, source.sds["model"])}
    current, snapshots = args.checkpoint, []
    for r in list(range(1, args.rounds + 1)) + (["distill"] if args.distill_epochs else []):
        if r == "distill":
            print(f"[distill] {args.distill_epochs} epochs from the ensemble of {len(snapshots)} snapshots "
                  f"(T = {args.kd_temperature:g}, alpha = {args.kd_alpha:g})", flush=True)
        # rounds depend on each other: one cell (one job) at a time
        dispatch.run_cells(args, results, [({"round": r}, (r, current, list(snapshots)))], context, compute, say,
                           name="iterative", ctx=local)
        if r != "distill":
            current = next(x for x in results.rows if x["round"] == r)["snapshot"]
            snapshots.append(current)
    print_table(results.rows, source_row)


def main(argv=None):
    return run_cli(lambda argv: run(get_args_parser().parse_args(argv)), argv)


if __name__ == "__main__":
    sys.exit(main())

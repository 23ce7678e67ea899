#!/usr/bin/env python
"""Size and speed of models: params, MACs, eval throughput, latency and train-step throughput.

Models are named by our registry (`convnext_tiny_13M_pruned_cifar10`), by stock timm name
(`resnet18`), by a checkpoint path (its `arch` rebuilds the shape), or as
`timm_convnext:<our name>`: timm's own ConvNeXt class with our model's depths, dims and classes.

    python scripts/benchmark.py --models convnext_tiny_unpruned_cifar10 convnext_tiny_3M_pruned_cifar10 \
        --batch_size 16 --json results.jsonl --plot speed.png

`--vs A B` times two models (or one model under two `--vs_settings`) alternately in one
process, printing B/A round by round, so a comparison holds on a busy machine:

    python scripts/benchmark.py --vs convnext_tiny --vs_settings channels_last=0 channels_last=1

Throughput is batch / median step time (robust to the odd slow step on a shared machine).
"""
import argparse
import json
import logging
import os
import shlex
import statistics
import sys
from dataclasses import replace


from deploy.runtime import AMP, Settings, check_settings, percentile, runtime_names
from checkpoints.sources import set_download_timeout
from cli.flags import add_download_flag, str2bool
from common.errors import ArgumentParser, UserError, parse_first, run_cli
from common.provenance import write_report
from common.files import atomic_open, atomic_path, check_output_file

MODES = ("eval", "latency", "train")


def _parse_amp(text):
    if text not in AMP:
        raise ValueError(f"expected one of {', '.join(AMP)}")
    return text


def _parse_positive(text):
    value = int(text)
    if value < 1:
        raise ValueError("expected a positive integer")
    return value


def _parse_backend(text):
    if text not in runtime_names():
        raise ValueError(f"expected one of {', '.join(runtime_names())}")
    return text


SETTING_PARSERS = {"channels_last": str2bool, "amp": _parse_amp, "compile": str2bool,
                   "batch_size": _parse_positive, "threads": _parse_positive, "backend": _parse_backend}


def get_args_parser():
    p = ArgumentParser("ConvNeXt benchmark", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", help="registered names, timm_convnext:<name> or checkpoints")
    p.add_argument("--vs", nargs="+", metavar="MODEL",
                   help="A B: time two models alternately; one model needs --vs_settings")
    p.add_argument("--vs_settings", nargs=2, metavar=("SETTINGS_A", "SETTINGS_B"),
                   help='per-side overrides, e.g. "channels_last=0" "channels_last=1,amp=bf16"; '
                        f"keys: {', '.join(SETTING_PARSERS)}")
    p.add_argument("--vs_mode", default="eval", choices=MODES, help="what --vs times")
    p.add_argument("--rounds", type=int, default=10, help="A B rounds of --vs")
    p.add_argument("--input_size", type=int, default=224)
    p.add_argument("--batch_size", type=int, default=32, help="batch of eval and train steps")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--channels_last", action="store_true")
    p.add_argument("--amp", default="none", choices=AMP, help="autocast dtype")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (= --backend compile)")
    p.add_argument("--backend", nargs="+", choices=runtime_names(), default=None,
                   help="runtimes to time, each model in each (default: eager); onnxruntime exports "
                        "the model first (and checks the graph's logits against PyTorch), "
                        "onnxruntime-int8 also quantizes it (calibrated on random images: speed only); "
                        "neither has a train step")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
    p.add_argument("--iters", type=int, default=10, help="timed steps (at least)")
    p.add_argument("--min_time", type=float, default=0., help="time steps for at least this many s")
    p.add_argument("--skip", default="", help=f"comma list of {', '.join(MODES)} to skip")
    p.add_argument("--json", help="write results as JSON lines (one per model)")
    p.add_argument("--plot", help="PNG of throughput against MACs")
    p.add_argument("--report", help="write the printed table as a markdown report that records the machine, "
                   "versions, commit and date (docs/results/ holds the ones the docs show)")
    p.add_argument("--overwrite", action="store_true", help="replace existing --json/--plot/--report files")
    add_download_flag(p)
    return p


if __name__ == "__main__":
    parse_first(get_args_parser)  # --help and flag errors before torch loads

import torch  # noqa: E402

import models  # noqa: E402
from models.complexity import count_params, forward_cost  # noqa: E402
from deploy.runners import make_runner  # noqa: E402
from deploy.specs import build  # noqa: E402


logger = logging.getLogger("benchmark")

JSON_FIELDS = ("model", "backend", "params", "macs", "input_size", "batch_size", "device", "amp",
               "channels_last", "compile", "threads", "eval_img_s", "eval_ms_median",
               "latency_ms_median", "latency_ms_p90", "train_img_s", "train_ms_median",
               "torch", "timm")


def parse_settings(text, base):
    """`"channels_last=1,amp=bf16"` -> `base` with those fields replaced ("" keeps `base`)."""
    changes = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key not in SETTING_PARSERS:
            raise UserError(f"bad --vs_settings item {item!r}: use KEY=VALUE with KEY in "
                            f"{', '.join(SETTING_PARSERS)}")
        try:
            changes[key] = SETTING_PARSERS[key](value)
        except (ValueError, argparse.ArgumentTypeError) as e:
            raise UserError(f"bad --vs_settings value {item!r}: {e}") from None
    return check_settings(replace(base, **changes))


# --- building models ----------------------------------------------------------------------

def benchmark_model(spec, settings, args):
    """Every measurement of one model, as one JSON-able dict with all JSON_FIELDS."""
    import timm
    model = build(spec)
    macs, num_classes = forward_cost(model, settings.input_size)
    row = dict.fromkeys(JSON_FIELDS)
    row.update(model=spec, backend=settings.backend, params=count_params(model), macs=macs,
               input_size=settings.input_size, batch_size=settings.batch_size,
               device=settings.device, amp=settings.amp, channels_last=settings.channels_last,
               compile=settings.compile, threads=settings.threads or torch.get_num_threads(),
               torch=torch.__version__, timm=timm.__version__)
    runner = make_runner(model, settings, num_classes)
    skip = set(args.skip) | ({"train"} if not settings.runtime.trains else set())
    for mode in (m for m in MODES if m not in skip):
        logger.info("%s: %s", spec, mode)
        runner.warmup(mode, args.warmup)
        ms = [t * 1e3 for t in runner.time(mode, args.iters, args.min_time)]
        median = statistics.median(ms)
        if mode == "latency":
            row.update(latency_ms_median=median, latency_ms_p90=percentile(ms, 90))
        else:
            row[f"{mode}_ms_median"] = median
            row[f"{mode}_img_s"] = runner.images_per_step(mode) * 1e3 / median
    return row


# --- reporting ----------------------------------------------------------------------------

def _fmt(value, spec, suffix=""):
    return "-" if value is None else f"{value:{spec}}{suffix}"


def markdown_table(rows):
    """The results as a Markdown table; speed-up and MACs ratio are relative to the first row
    of the same backend."""
    head = ("| model | backend | params (M) | MACs (G) | eval img/s | latency ms median/p90 "
            "| train img/s | speed-up | MACs ratio | speed-up / MACs ratio |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    bases = {}
    for r in rows:
        base = bases.setdefault(r["backend"], r)
        speedup = (r["eval_img_s"] / base["eval_img_s"]
                   if r["eval_img_s"] and base["eval_img_s"] else None)
        macs_ratio = base["macs"] / r["macs"] if r["macs"] else None
        share = speedup / macs_ratio if speedup and macs_ratio else None
        latency = ("-" if r["latency_ms_median"] is None else
                   f"{r['latency_ms_median']:.2f} / {r['latency_ms_p90']:.2f}")
        lines.append(f"| {r['model']} | {r['backend']} | {r['params'] / 1e6:.2f} | {r['macs'] / 1e9:.3f} "
                     f"| {_fmt(r['eval_img_s'], '.1f')} | {latency} | {_fmt(r['train_img_s'], '.1f')} "
                     f"| {_fmt(speedup, '.2f', 'x')} | {_fmt(macs_ratio, '.2f', 'x')} "
                     f"| {_fmt(share, '.2f')} |")
    return "\n".join(lines)


def write_plot(rows, path):
    """Throughput against MACs, one labelled point per model (matplotlib only imported here)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    key = "eval_img_s" if rows[0]["eval_img_s"] is not None else "train_img_s"
    fig, ax = plt.subplots(figsize=(7, 5))
    for r in rows:  # a legend, not labels: pruned variants sit close together
        several = len({x["backend"] for x in rows}) > 1
        ax.scatter([r["macs"] / 1e9], [r[key]],
                   label=f"{r['model']} ({r['backend']})" if several else r["model"])
    ax.legend(fontsize=8, loc="upper right")
    ax.set_xlabel(f"GMACs per image ({rows[0]['input_size']} px)")
    ax.set_ylabel(f"{key.split('_')[0]} throughput (img/s, batch {rows[0]['batch_size']})")
    ax.set_title(f"{rows[0]['device']}, amp={rows[0]['amp']}, "
                 f"channels_last={int(rows[0]['channels_last'])}")
    # from the origin, so the gap between points reads as a ratio
    ax.set_xlim(0, 1.1 * max(r["macs"] / 1e9 for r in rows))
    ax.set_ylim(0, 1.15 * max(r[key] for r in rows))
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    with atomic_path(path, suffix=os.path.splitext(path)[1]) as tmp:  # replaces a link, never its target
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def write_json(records, path):
    with atomic_open(path) as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


# --- the two modes --------------------------------------------------------------------------

def run_list(args, settings):
    rows = []
    for backend in args.backend:
        for spec in args.models:
            rows.append(benchmark_model(spec, check_settings(replace(settings, backend=backend)), args))
            logger.info("%s", json.dumps(rows[-1]))
    table = markdown_table(rows)
    print(table)
    if args.report:
        write_report(args.report, "scripts/benchmark.py", args.command, table, overwrite=True)
    if args.json:
        write_json(rows, args.json)
    if args.plot:
        write_plot(rows, args.plot)
    return rows


def run_vs(args, settings):
    """Time A and B alternately, `--rounds` times; print B/A throughput per round and its spread."""
    spec_a, spec_b = args.vs if len(args.vs) == 2 else (args.vs[0], args.vs[0])
    texts = args.vs_settings or ("", "")
    sides = []
    for spec, text in zip((spec_a, spec_b), texts):
        s = parse_settings(text, settings)
        model = build(spec)
        macs, num_classes = forward_cost(model, s.input_size)
        if not s.runtime.trains and args.vs_mode == "train":
            raise UserError(f"the {s.backend} backend has no training step: --vs_mode eval or latency")
        sides.append((f"{spec} [{s.describe()}]", make_runner(model, s, num_classes), macs))
    mode = args.vs_mode
    for _, runner, _ in sides:
        runner.warmup(mode, args.warmup)
    print(f"A: {sides[0][0]}\nB: {sides[1][0]}\n"
          f"mode {mode}, {settings.input_size} px, {settings.device}, {args.rounds} rounds "
          f"of >= {args.iters} steps\n")
    print("| round | A img/s | B img/s | B/A |\n|---|---|---|---|")
    rates = ([], [])
    for i in range(args.rounds):
        for k, (_, runner, _) in enumerate(sides):
            median = statistics.median(runner.time(mode, args.iters, args.min_time))
            rates[k].append(runner.images_per_step(mode) / median)
        print(f"| {i + 1} | {rates[0][-1]:.2f} | {rates[1][-1]:.2f} "
              f"| {rates[1][-1] / rates[0][-1]:.3f} |", flush=True)
    ratios = [b / a for a, b in zip(*rates)]
    summary = {"a": sides[0][0], "b": sides[1][0], "mode": mode, "input_size": settings.input_size,
               "device": settings.device, "rounds": args.rounds, "a_macs": sides[0][2],
               "b_macs": sides[1][2], "a_img_s": rates[0],
               "b_img_s": rates[1], "ratios": ratios, "ratio_median": statistics.median(ratios),
               "ratio_min": min(ratios), "ratio_max": max(ratios), "torch": torch.__version__}
    line = (f"B/A median {summary['ratio_median']:.3f} (min {summary['ratio_min']:.3f}, "
            f"max {summary['ratio_max']:.3f}) over {args.rounds} rounds; "
            f"A median {statistics.median(rates[0]):.2f} img/s, "
            f"B median {statistics.median(rates[1]):.2f} img/s; MACs ratio A/B "
            f"{sides[0][2] / sides[1][2]:.3f}")
    print("\n" + line)
    if args.report:
        write_report(args.report, "scripts/benchmark.py", args.command,
                     f"A: {sides[0][0]}\n\nB: {sides[1][0]}\n\n{line}", overwrite=True)
    if args.json:
        write_json([summary], args.json)
    return summary


# --- command line -------------------------------------------------------------------------


def check_args(args):
    """Every bad flag combination is one clear line, before any timing starts."""
    set_download_timeout(args.download_timeout)
    if bool(args.models) == bool(args.vs):
        raise UserError("give either --models A [B ...] or --vs A [B]")
    if args.vs and not 1 <= len(args.vs) <= 2:
        raise UserError("--vs takes one or two models")
    if args.vs and len(args.vs) == 1 and not args.vs_settings:
        raise UserError("--vs with one model needs --vs_settings SETTINGS_A SETTINGS_B")
    if args.vs_settings and not args.vs:
        raise UserError("--vs_settings only applies to --vs")
    if args.backend and args.compile:
        raise UserError("give --backend compile, not --compile with --backend")
    if args.backend and args.vs:
        raise UserError("--backend applies to --models; with --vs use --vs_settings backend=...")
    args.backend = args.backend or ["eager"]
    if args.vs and args.skip:
        raise UserError("--skip applies to --models; --vs times one mode, chosen by --vs_mode")
    if args.vs and args.plot:
        raise UserError("--plot applies to --models, not --vs")
    args.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if args.skip - set(MODES):
        raise UserError(f"--skip: unknown {', '.join(sorted(args.skip - set(MODES)))}; "
                        f"choose from {', '.join(MODES)}")
    if args.plot and {"eval", "train"} <= args.skip:
        raise UserError("--plot needs eval or train throughput; do not skip both")
    for name in ("input_size", "batch_size", "iters", "rounds"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1")
    if args.warmup < 0 or args.threads < 0:
        raise UserError("--warmup and --threads cannot be negative")
    if not 0 <= args.min_time <= 3600:
        raise UserError(f"--min_time must be in [0, 3600] seconds, got {args.min_time}")
    for flag, path in (("--json", args.json), ("--plot", args.plot), ("--report", args.report)):
        if path is not None:
            check_output_file(path, flag, args.overwrite)
    try:
        torch.device(args.device)
    except RuntimeError:
        raise UserError(f"--device {args.device!r} is not a device (cpu, cuda, cuda:N)") from None


def main(argv=None):
    """Run the benchmark; returns the rows (or the --vs summary). Bad input: UserError."""
    args = get_args_parser().parse_args(argv)
    args.command = "python scripts/benchmark.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = check_settings(Settings(args.device, args.input_size, args.batch_size,
                                       args.channels_last, args.amp, args.compile, args.threads))
    if settings.device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest
    return run_vs(args, settings) if args.vs else run_list(args, settings)


def cli(argv=None):
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())

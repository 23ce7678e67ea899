"""Which models the traced family prunes: every torchvision classification model (but the
largest), timm's families and an audio CNN of the PANNs CNN14 kind, each with half its prunable
channels cut (studies/prunability.py), one table row per model.

    python scripts/prunability.py --report docs/results/prunability.md
    python scripts/prunability.py --models timm:resnet50 torchvision:densenet121 --tracers
"""
import os
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common.errors import ArgumentParser, UserError, parse_first, run_cli  # noqa: E402

SETS = ("torchvision", "timm", "audio")


def get_args_parser():
    p = ArgumentParser("prunability", description=__doc__)
    p.add_argument("--models", nargs="+", default=list(SETS),
                   help="sets (torchvision, timm, audio) and / or single models as timm:NAME or torchvision:NAME")
    p.add_argument("--input_sizes", type=int, nargs="+", default=[64, 224],
                   help="image sides tried in order: a model runs at the first it takes")
    p.add_argument("--criterion", default="opnorm", help="the criterion that picks the channels")
    p.add_argument("--ratio", type=float, default=0.5, help="share of the prunable channels kept")
    p.add_argument("--skip_largest", type=int, default=6, help="torchvision's largest models left out")
    p.add_argument("--tracers", action="store_true", help="also try torch.fx and torch.export on each model")
    p.add_argument("--vs_declared", metavar="NAME", help="instead: time pruning one of our models (e.g. "
                   "convnext_tiny) declared against traced, alternately, --rounds times")
    p.add_argument("--rounds", type=int, default=5, help="timed pairs for --vs_declared")
    p.add_argument("--report", help="write the table as a markdown report (machine, versions, commit, date)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --report file")
    return p


if __name__ == "__main__":
    parse_first(get_args_parser)  # --help and flag errors before torch loads

from common.files import check_output_file  # noqa: E402
from common.provenance import write_report  # noqa: E402
from studies import prunability  # noqa: E402

HEADER = ["| source | model | px | result | groups | kept whole | params after | MACs after | reload Δ | "
          "ONNX Δ | silenced Δ |",
          "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]


def targets(items, skip_largest):
    out = []
    for item in items:
        if item == "torchvision":
            out += [("torchvision", n) for n in prunability.torchvision_names(skip_largest)]
        elif item == "timm":
            out += [("timm", n) for n in prunability.TIMM_MODELS]
        elif item == "audio":
            out.append(("audio", "cnn14_like"))
        elif item.partition(":")[0] in ("timm", "torchvision") and item.partition(":")[2]:
            out.append(tuple(item.split(":", 1)))
        else:
            raise UserError(f"--models {item}: give torchvision, timm, audio, timm:NAME or torchvision:NAME")
    return out


def line(row):
    def share(pair):
        return f"{pair[1] / pair[0]:.1%}" if pair[0] else ""

    def diff(v):
        return "" if v is None else f"{v:.1e}"
    result = row.status if row.status == "pruned" else f"{row.status}: {row.why[:90]}"
    if row.status == "pruned" and not row.forward:
        result = "pruned, forward fails"
    if row.tracers:
        result += f" (fx {row.tracers['fx']}, export {row.tracers['export']})"
    return (f"| {row.source} | {row.name} | {row.input_size or ''} | {result} | {row.groups} | {row.whole} | "
            f"{share(row.params)} | {share(row.macs)} | {diff(row.reload_diff)} | {diff(row.onnx_diff)} | "
            f"{diff(row.exact_diff)}{'' if row.batchnorm or row.exact_diff is None else ' (no BN)'} |")


def summary(rows):
    done = [r for r in rows if r.status == "pruned" and r.forward]
    ok = [r for r in done if r.reload_diff is not None and r.reload_diff < 1e-5]
    onnx = [r for r in done if r.onnx_diff is not None and r.onnx_diff < 1e-3]
    text = [f"{len(done)} of {len(rows)} pruned and ran; {len(ok)} reloaded from the file alone to the same logits "
            f"(< 1e-5); {len(onnx)} exported to ONNX with parity (< 1e-3)."]
    if any(r.tracers for r in rows):
        for t in ("fx", "export"):
            n = sum(1 for r in rows if r.tracers and r.tracers[t] == "yes")
            text.append(f"{t}: traces {n} of {len(rows)}.")
    return " ".join(text)


def vs_declared(args):
    import statistics
    import models
    if args.vs_declared not in models.OUR_MODELS or args.rounds < 1:
        raise UserError("--vs_declared takes one of our registered models and --rounds >= 1")
    size = args.input_sizes[-1]
    declared, traced = prunability.trace_cost(args.vs_declared, size, args.rounds)
    d, t = statistics.median(declared), statistics.median(traced)
    print(f"{args.vs_declared} @ {size} px, opnorm ratio 0.5, {args.rounds} alternating pairs: declared "
          f"{d:.2f} s, traced {t:.2f} s (median; traced / declared = {t / d:.2f}x, per pair "
          + ", ".join(f"{b / a:.2f}" for a, b in zip(declared, traced)) + ")")


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    if not 0 < args.ratio < 1:
        raise UserError("--ratio must be in (0, 1)")
    if min(args.input_sizes) < 8 or args.skip_largest < 0:
        raise UserError("--input_sizes must be >= 8 and --skip_largest >= 0")
    if args.vs_declared:
        return vs_declared(args)
    if args.report:
        check_output_file(args.report, "--report", args.overwrite)
    rows = []
    print("\n".join(HEADER), flush=True)
    for source, name in targets(args.models, args.skip_largest):
        rows.append(prunability.check(source, name, tuple(args.input_sizes), args.criterion, args.ratio, args.tracers))
        print(line(rows[-1]), flush=True)
    print(summary(rows))
    if args.report:
        command = "python scripts/prunability.py " + shlex.join(sys.argv[1:] if argv is None else argv)
        body = "\n".join(HEADER + [line(r) for r in rows]) + "\n\n" + summary(rows)
        write_report(args.report, "scripts/prunability.py", command, body, overwrite=True)


if __name__ == "__main__":
    sys.exit(run_cli(main))

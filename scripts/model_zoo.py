"""Print docs/models.md's model zoo table: every registered model, params and MACs (FlopCounterMode)."""
import os
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common.errors import ArgumentParser, UserError, parse_first, run_cli  # noqa: E402


def get_args_parser():
    p = ArgumentParser("model_zoo", description=__doc__)
    p.add_argument("--input_sizes", type=int, nargs="+", default=[224, 32],
                   help="image sides to count MACs at (CIFAR networks are meant for 32 px)")
    p.add_argument("--report", help="also write the table as a markdown report with the machine, versions, "
                   "commit and date (docs/results/model_zoo.md is the docs' copy)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --report file")
    return p


if __name__ == "__main__":
    parse_first(get_args_parser)  # --help and flag errors before torch loads

import torch  # noqa: E402

from common.files import check_output_file  # noqa: E402
from common.provenance import write_report  # noqa: E402

import models  # noqa: E402
from models.complexity import count_macs, count_params  # noqa: E402


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    if min(args.input_sizes) < 1:
        raise UserError("--input_sizes must be >= 1")
    if args.report:
        check_output_file(args.report, "--report", args.overwrite)
    sizes = " | ".join(f"MACs @ {s} px" for s in args.input_sizes)
    lines = [f"| model | shape | classes | params | {sizes} |", "|---|---|---:|---:|" + "---:|" * len(args.input_sizes)]
    for name in models.OUR_MODELS:
        with torch.device("meta"):  # shapes only: no memory, no time
            model = models.create_model(name)
        arch = model.arch
        macs = " | ".join(_giga(count_macs(model, s)) for s in args.input_sizes)
        lines.append(f"| `{name}` | {models.FAMILIES[arch['family']].describe(arch)} | {arch['num_classes']} | "
                     f"{count_params(model):,} | {macs} |")
    print("\n".join(lines))
    if args.report:
        command = "python scripts/model_zoo.py " + shlex.join(sys.argv[1:] if argv is None else argv)
        write_report(args.report, "scripts/model_zoo.py", command, "\n".join(lines), overwrite=True)


def _giga(macs):
    return f"{macs / 1e9:.2f} G" if macs >= 1e9 else f"{macs / 1e6:.1f} M"


if __name__ == "__main__":
    sys.exit(run_cli(main))

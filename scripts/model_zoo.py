"""Print docs/models.md's model zoo table: every registered model, params and MACs (FlopCounterMode)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common.errors import ArgumentParser, UserError, parse_first, run_cli  # noqa: E402


def get_args_parser():
    p = ArgumentParser("model_zoo", description=__doc__)
    p.add_argument("--input_sizes", type=int, nargs="+", default=[224, 32],
                   help="image sides to count MACs at (CIFAR networks are meant for 32 px)")
    return p


if __name__ == "__main__":
    parse_first(get_args_parser)  # --help and flag errors before torch loads

import torch  # noqa: E402

import models  # noqa: E402
from models.complexity import count_macs, count_params  # noqa: E402


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    if min(args.input_sizes) < 1:
        raise UserError("--input_sizes must be >= 1")
    sizes = " | ".join(f"MACs @ {s} px" for s in args.input_sizes)
    print(f"| model | shape | classes | params | {sizes} |")
    print("|---|---|---:|---:|" + "---:|" * len(args.input_sizes))
    for name in models.OUR_MODELS:
        with torch.device("meta"):  # shapes only: no memory, no time
            model = models.create_model(name)
        arch = model.arch
        macs = " | ".join(_giga(count_macs(model, s)) for s in args.input_sizes)
        print(f"| `{name}` | {models.FAMILIES[arch['family']].describe(arch)} | {arch['num_classes']} | "
              f"{count_params(model):,} | {macs} |")


def _giga(macs):
    return f"{macs / 1e9:.2f} G" if macs >= 1e9 else f"{macs / 1e6:.1f} M"


if __name__ == "__main__":
    sys.exit(run_cli(main))

"""Print the README's model zoo table: every registered model, params and MACs (FlopCounterMode)."""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import models  # noqa: E402
from models.complexity import count_macs, count_params  # noqa: E402


def shape_of(arch):
    if arch["family"] == "convnext_isotropic":
        return f"isotropic, depth {arch['depth']}, dim {arch['dim']}"
    kind = ", multi-scale dw" if arch["dw"] == "multiscale" else ""
    return f"depths {'-'.join(map(str, arch['depths']))}, dims {'-'.join(map(str, arch['dims']))}{kind}"


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--input_size", type=int, default=224)
    args = parser.parse_args()
    print(f"| model | shape | classes | params | MACs @ {args.input_size} px |")
    print("|---|---|---:|---:|---:|")
    for name in models.OUR_MODELS:
        with torch.device("meta"):  # shapes only: no memory, no time
            model = models.create_model(name)
        arch = model.arch
        print(f"| `{name}` | {shape_of(arch)} | {arch['num_classes']} | "
              f"{count_params(model):,} | {count_macs(model, args.input_size) / 1e9:.2f} G |")


if __name__ == "__main__":
    main()

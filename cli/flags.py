"""Names and flags the command lines share, importable without torch: every --help and flag
check runs before PyTorch, timm or a data set is loaded (`errors.parse_first`).

The --data_set names (datasets.py reads them), --download_timeout (the sources themselves:
checkpoints/sources.py), the official `--flag true`
booleans and the LR schedules.
"""
import argparse

from checkpoints.sources import DOWNLOAD_TIMEOUT

DATA_SETS = ("CIFAR10", "CIFAR100", "TINY_IMAGENET", "IMNET", "image_folder", "DIGITS")
SCHEDULES = ("cosine", "step", "multistep")


def str2bool(v):
    """Parse `true/false` style flag values (the official `--flag true` convention)."""
    if isinstance(v, bool):
        return v
    if v.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if v.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"boolean value expected (true/false), not {v!r}")


def add_download_flag(parser):
    """--download_timeout, for every command that reads checkpoints (apply: set_download_timeout)."""
    parser.add_argument("--download_timeout", type=float, default=DOWNLOAD_TIMEOUT, metavar="SECONDS",
                        help="an http(s) checkpoint download fails when connecting or a read waits "
                             f"longer than this (default {DOWNLOAD_TIMEOUT:g})")

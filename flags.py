"""Names and flags the command lines share, importable without torch: every --help and flag
check runs before PyTorch, timm or a data set is loaded (`errors.parse_first`).

The --data_set names (datasets.py reads them), the checkpoint sources (a path, an http(s)
URL, hf-hub:ORG/NAME) and their checks, --download_timeout, the official `--flag true`
booleans and the LR schedules.
"""
import argparse
import os
import re

from errors import UserError

DATA_SETS = ("CIFAR10", "CIFAR100", "TINY_IMAGENET", "IMNET", "image_folder", "DIGITS")
SCHEDULES = ("cosine", "step", "multistep")
HF_HUB = "hf-hub:"  # hf-hub:ORG/NAME[@REVISION], as timm names Hub weights
DOWNLOAD_TIMEOUT = 60.0  # seconds a connect or a read may wait (--download_timeout)


def str2bool(v):
    """Parse `true/false` style flag values (the official `--flag true` convention)."""
    if isinstance(v, bool):
        return v
    if v.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if v.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"boolean value expected (true/false), not {v!r}")


def is_url(path):
    return bool(re.match(r"^https?://", os.fspath(path), re.I))


def is_remote(path):
    """An http(s) URL or an hf-hub: id: fetched into a cache, then read like a local file."""
    return is_url(path) or os.fspath(path).startswith(HF_HUB)


def check_source(path, what):
    """Refuse a local checkpoint path that is missing or a folder, before any work (URLs and
    hf-hub: ids are checked when fetched). `what` names it: "--resume x.pth", "checkpoint"."""
    path = os.fspath(path)
    if is_remote(path):
        return
    if os.path.isdir(path):
        raise UserError(f"{what}: is a folder, not a checkpoint file")
    if not os.path.isfile(path):
        raise UserError(f"{what}: no such file (checkpoint not found)")


def add_download_flag(parser):
    """--download_timeout, for every command that reads checkpoints (apply: set_download_timeout)."""
    parser.add_argument("--download_timeout", type=float, default=DOWNLOAD_TIMEOUT, metavar="SECONDS",
                        help="an http(s) checkpoint download fails when connecting or a read waits "
                             f"longer than this (default {DOWNLOAD_TIMEOUT:g})")


def set_download_timeout(seconds):
    """Range-checked, before any work; checkpoint.download reads it."""
    global DOWNLOAD_TIMEOUT
    if not (isinstance(seconds, (int, float)) and 0 < seconds <= 86400):
        raise UserError(f"--download_timeout must be in (0, 86400] seconds, got {seconds}")
    DOWNLOAD_TIMEOUT = float(seconds)

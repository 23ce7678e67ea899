"""Shared helpers: user-facing errors and safe, atomic checkpoint files."""
import argparse
import os
import pickle
import tempfile

import numpy as np
import torch


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit status 2."""


# Globals a released checkpoint may hold besides tensors; none can run code.
_NP_CORE = getattr(np, "_core", None) or np.core
SAFE_GLOBALS = [argparse.Namespace, np.dtype, _NP_CORE.multiarray.scalar,
                np.dtypes.Float64DType, np.dtypes.Float32DType, np.dtypes.Int64DType]


def save_checkpoint_file(obj, path):
    """Write `obj` with torch.save atomically: a temp file in the same folder, then rename."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pth", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_checkpoint_file(path, map_location="cpu"):
    """Load a checkpoint without running code from it (weights_only + an allow-list)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()
        hint = next((line.strip() for line in first if "GLOBAL" in line or "Unsupported" in line), "")
        raise UserError(f"refusing to load {path}: it needs code or classes outside the safe "
                        f"allow-list ({hint or 'unsupported pickle content'})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise UserError(f"cannot read checkpoint {path}: truncated or not a PyTorch file "
                        f"({str(e).splitlines()[0][:120]})") from None

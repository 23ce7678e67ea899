"""Reading and writing checkpoint files. Reading never runs code from the file (weights_only +
an allow-list of plain classes); writing is atomic (common/files.py), so a kill leaves either
the old file or the new one. The files of a training run are managed by training/run_folder.py."""
import argparse
import json
import os
import pathlib
import pickle

import numpy as np
import torch

from checkpoints.formats import SAFETENSORS_META, check_format, check_zip, load_safetensors
from checkpoints.sources import local_copy
from common.errors import UserError, first_line
from common.files import atomic_open

# Globals a released checkpoint may hold besides tensors; none can run code. Official
# checkpoints written under SLURM hold pathlib paths in their args.
_NP_CORE = getattr(np, "_core", None) or np.core
SAFE_GLOBALS = [argparse.Namespace, np.dtype, _NP_CORE.multiarray.scalar,
                np.dtypes.Float64DType, np.dtypes.Float32DType, np.dtypes.Int64DType,
                pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePosixPath,
                pathlib.PureWindowsPath]


def save_checkpoint_file(obj, path):
    """Write `obj` with torch.save atomically (files.atomic_open)."""
    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


def load_checkpoint_file(path, map_location="cpu", mmap=False):
    """Load a checkpoint (a local path, an http(s) URL or an hf-hub: id; a torch.save file or
    a .safetensors file) without running code from it. With mmap, tensors of a torch file are
    mapped from it, not read (a cheap look at its entries)."""
    shown = os.fspath(path)
    path = local_copy(path)
    if os.path.isdir(path):
        raise UserError(f"{shown} is a folder, not a checkpoint file")
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {shown}")
    kind = check_format(path, shown)
    if kind == "safetensors":
        return load_safetensors(path, shown, map_location)
    if not mmap and kind == "zip":  # mmap: a cheap look at the entries, not a read of the tensors
        check_zip(path, shown)
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        lines = str(e).strip().splitlines()
        hint = next((line.strip() for line in lines if "GLOBAL" in line or "Unsupported" in line), "")
        raise UserError(f"refusing to load {shown}: it needs code or classes outside the safe "
                        f"allow-list ({hint or 'unsupported pickle content'})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise UserError(f"cannot read checkpoint {shown}: truncated or damaged PyTorch file "
                        f"({first_line(e, 160)})") from None


def save_weights_file(ckpt, path):
    """Write a checkpoint's model weights as safetensors (atomically), its arch, args and
    pruning record in the metadata: weights to share, readable without pickle (not a training
    state to resume: no optimizer, no EMA)."""
    from safetensors.torch import save
    meta = {"format": "pt", **{k: json.dumps(ckpt[k]) for k in SAFETENSORS_META if ckpt.get(k) is not None}}
    state = {k: v.contiguous() for k, v in ckpt["model"].items()}
    with atomic_open(path, "wb") as f:
        f.write(save(state, metadata=meta))

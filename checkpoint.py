"""Checkpoint files: safe reading (local paths and URLs), atomic writing, the weights inside.

Reading never runs code from the file (weights_only + an allow-list of plain classes). Writing
is atomic (files.py), so a kill leaves either the old file or the new one. The files of a training run in --output_dir are managed by `run_folder.py`.
"""
import argparse
import hashlib
import json
import logging
import os
import pathlib
import pickle
import re
import sys
import tarfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

import flags
import models
from errors import UserError, first_line
from flags import HF_HUB, is_url
from files import atomic_open, atomic_path, sha256_file

logger = logging.getLogger(__name__)

# Globals a released checkpoint may hold besides tensors; none can run code. Official
# checkpoints written under SLURM hold pathlib paths in their args.
_NP_CORE = getattr(np, "_core", None) or np.core
SAFE_GLOBALS = [argparse.Namespace, np.dtype, _NP_CORE.multiarray.scalar,
                np.dtypes.Float64DType, np.dtypes.Float32DType, np.dtypes.Int64DType,
                pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePosixPath,
                pathlib.PureWindowsPath]


HUB_WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # what a Hub model repo holds, preferred first


def local_copy(path):
    """`path` itself, or for an http(s) URL its copy in the torch hub cache (downloaded once,
    with a progress bar; a `-<hex>.` hash prefix in the file name is checked), or for an
    hf-hub: id its copy in the Hugging Face cache (hub_copy)."""
    path = os.fspath(path)
    if path.startswith(HF_HUB):
        return hub_copy(path)
    if not is_url(path):
        if re.match(r"^[a-z][a-z0-9+.-]*://", path, re.I):
            raise UserError(f"cannot read {path}: only local paths, http(s) URLs and hf-hub:ORG/NAME are supported")
        return path
    return download(path)


def download(url):
    """The local copy of an http(s) URL: `<torch hub>/checkpoints/<hash of the whole URL>/<name>`,
    downloaded once with a progress bar into a temp name, with a connect / read timeout,
    checked against Content-Length, a `-<hex>.` hash prefix in the name, and the file's own
    structure (a zip's CRCs, a safetensors header) before it is renamed into the cache."""
    name = os.path.basename(urllib.parse.urlparse(url).path) or "checkpoint.pth"
    folder = os.path.join(torch.hub.get_dir(), "checkpoints", hashlib.sha256(url.encode()).hexdigest()[:16])
    dst = os.path.join(folder, name)
    if os.path.isfile(dst):
        logger.info("Using the cached download %s", dst)
        return dst
    logger.warning("Downloading %s to %s", url, dst)
    match = torch.hub.HASH_REGEX.search(name)
    try:
        with atomic_path(dst) as tmp:
            _fetch(url, tmp, name)
            if match and not sha256_file(tmp).startswith(match.group(1)):
                raise UserError(f"download of {url} is corrupt: its sha256 does not start with "
                                f"{match.group(1)} (the hash in its name)")
            _check_structure(tmp, url)
    except urllib.error.HTTPError as e:
        raise UserError(f"cannot download {url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", None) or e
        raise UserError(f"cannot download {url}: {first_line(reason)}"
                        + (f" (no answer within --download_timeout {flags.DOWNLOAD_TIMEOUT:g} s)"
                           if isinstance(reason, TimeoutError) else "")) from None
    return dst


def _fetch(url, path, name):
    from tqdm import tqdm
    request = urllib.request.Request(url, headers={"User-Agent": "efficient-convnext"})
    with urllib.request.urlopen(request, timeout=flags.DOWNLOAD_TIMEOUT) as response, open(path, "wb") as f:
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        got = 0
        with tqdm(total=total, unit="B", unit_scale=True, desc=name, file=sys.stderr) as bar:
            while chunk := response.read(1 << 20):
                f.write(chunk)
                got += len(chunk)
                bar.update(len(chunk))
    if total is not None and got != total:
        raise UserError(f"download of {url} was cut short ({got:,} of {total:,} bytes); nothing was cached")


def _check_structure(path, shown):
    """Refuse a file whose own structure says it is incomplete or damaged."""
    kind = _check_format(path, shown)
    if kind == "safetensors":
        _load_safetensors(path, shown, "cpu")
    elif kind == "zip":
        check_zip(path, shown)


def check_zip(path, shown):
    """Verify the CRC of every member of a torch.save zip (a flipped byte in a tensor is
    otherwise loaded silently)."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise UserError(f"cannot read checkpoint {shown}: truncated or damaged PyTorch file ({first_line(e)})") from None
    if bad is not None:
        raise UserError(f"checkpoint {shown} is damaged: the CRC of {bad} does not match its bytes")


def hub_copy(ref):
    """The local copy of the weights of `hf-hub:ORG/NAME[@REVISION]` (HUB_WEIGHTS, the first
    the repo has), fetched by huggingface_hub into its cache with a progress bar; its
    settings hold (HF_HUB_OFFLINE=1 reads the cached copy, HF_ENDPOINT, HF_HOME, tokens)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RemoteEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)
    repo, _, revision = ref[len(HF_HUB):].partition("@")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo):
        raise UserError(f"{ref}: expected hf-hub:ORG/NAME or hf-hub:ORG/NAME@REVISION")
    for filename in HUB_WEIGHTS:
        try:
            return hf_hub_download(repo, filename, revision=revision or None)
        except RemoteEntryNotFoundError:
            continue
        except LocalEntryNotFoundError:
            raise UserError(f"{ref}: not in the local Hugging Face cache, and the Hub cannot be "
                            "reached (offline, or HF_HUB_OFFLINE=1)") from None
        except GatedRepoError:
            raise UserError(f"{ref} is gated: accept its terms on the Hub and log in (hf auth login)") from None
        except RepositoryNotFoundError:
            raise UserError(f"{ref}: no such model repository on the Hub (or a private one: "
                            "log in with hf auth login)") from None
        except RevisionNotFoundError:
            raise UserError(f"{ref}: the repository has no revision {revision!r}") from None
        except (HfHubHTTPError, OSError) as e:
            raise UserError(f"cannot download {ref}: {first_line(e)}") from None
    raise UserError(f"{ref} holds no weights ({' or '.join(HUB_WEIGHTS)})")


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
    kind = _check_format(path, shown)
    if kind == "safetensors":
        return _load_safetensors(path, shown, map_location)
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


def _check_format(path, shown):
    """"zip" or "pickle" (torch.save), or "safetensors"; refuses files that are none of these,
    saying what they are."""
    with open(path, "rb") as f:
        head = f.read(9)
    if not head:
        raise UserError(f"{shown} is empty (0 bytes): not a checkpoint")
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if head[:1] == b"\x80":  # torch.save's legacy format: a plain pickle
        return "pickle"
    if path.endswith(".safetensors") or (  # an 8-byte header length, then the JSON header
            len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < os.path.getsize(path)):
        return "safetensors"
    if tarfile.is_tarfile(path):
        raise UserError(f"{shown} is in the legacy tar format of PyTorch before 0.4, which cannot "
                        "be read safely: load it with that PyTorch and save it again")
    raise UserError(f"{shown} is not a PyTorch checkpoint (neither a torch.save file nor safetensors)")


def _load_safetensors(path, shown, map_location):
    """{"model": tensors, plus the "arch" / "args" this toolkit writes into the metadata}."""
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(path, "pt", device=str(map_location)) as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise UserError(f"cannot read {shown}: truncated or damaged safetensors file "
                        f"({first_line(e, 160)})") from None
    ckpt = {"model": tensors}
    for key in SAFETENSORS_META:
        if key in meta:
            try:
                ckpt[key] = json.loads(meta[key])
            except json.JSONDecodeError:
                raise UserError(f"cannot read {shown}: its {key!r} metadata is not JSON") from None
    return ckpt


SAFETENSORS_META = ("arch", "args", "pruning")  # entries kept as JSON in a safetensors file's metadata


def save_weights_file(ckpt, path):
    """Write a checkpoint's model weights as safetensors (atomically), its arch, args and
    pruning record in the metadata: weights to share, readable without pickle (not a training
    state to resume: no optimizer, no EMA)."""
    from safetensors.torch import save
    meta = {"format": "pt", **{k: json.dumps(ckpt[k]) for k in SAFETENSORS_META if ckpt.get(k) is not None}}
    state = {k: v.contiguous() for k, v in ckpt["model"].items()}
    with atomic_open(path, "wb") as f:
        f.write(save(state, metadata=meta))


def onnx_graph_sha256(model_proto):
    """The hash of an ONNX graph (operators and weights): stored in the file by
    scripts/export.py and checked by scripts/inference.py, so a damaged file is refused."""
    return hashlib.sha256(model_proto.graph.SerializeToString(deterministic=True)).hexdigest()


def args_to_dict(args):
    """Flags (a Namespace, or a dict as checkpoints hold them) as a plain dict of JSON-able
    values, so weights_only loading accepts it; anything else is an empty dict."""
    def plain(v):
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return str(v)  # e.g. a pathlib.Path set by run_with_submitit.py
    items = vars(args) if isinstance(args, argparse.Namespace) else args if isinstance(args, dict) else {}
    return {k: plain(v) for k, v in items.items()}


def saved_args(ckpt):
    """The flags a checkpoint was trained with, as a plain dict ({} when it has none)."""
    return args_to_dict(ckpt.get("args")) if isinstance(ckpt, dict) else {}


def ema_module(model_ema):
    """The averaged module of timm's ModelEmaV2/V3 (`.module`) or the official ModelEma (`.ema`)."""
    return model_ema.module if hasattr(model_ema, "module") else model_ema.ema


# ----------------------------------------------------------------------------- the weights inside

def model_state(checkpoint, model_key="model|module", model_prefix=""):
    """The model weights in a checkpoint: the first of `model_key` ('a|b') present, else the
    checkpoint itself; with `model_prefix`, only keys under it, with the prefix removed.
    Refuses weights that hold NaN or infinite values (a diverged run)."""
    if not isinstance(checkpoint, dict):
        raise UserError("the checkpoint is not a dict of weights")
    state = next((checkpoint[k] for k in model_key.split("|") if k in checkpoint), checkpoint)
    if not isinstance(state, dict):
        raise UserError(f"the checkpoint's {model_key!r} entry is not a dict of weights")
    if model_prefix:
        state = {k[len(model_prefix):]: v for k, v in state.items() if k.startswith(model_prefix)}
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise UserError(f"the checkpoint holds no weights under {model_key!r}"
                        + (f" with prefix {model_prefix!r}" if model_prefix else ""))
    bad = models.weights.nonfinite_keys(tensors)
    if bad:
        raise UserError(f"the checkpoint's weights hold NaN or infinite values ({len(bad)} tensors, "
                        f"e.g. {bad[0]}): it comes from a diverged run and gives no meaningful result")
    return tensors


def held_model(ckpt, state, model_name=None):
    """Which model a checkpoint holds, the one answer every tool uses: (arch, None) for a shape
    of ours, or (None, name) for a registered model name. In order: `model_name` when given
    (the weights must then fit it), the checkpoint's `arch`, the shape read off its weights,
    the --model saved in its args (e.g. a stock timm model)."""
    if model_name:
        return None, model_name
    if isinstance(ckpt, dict) and isinstance(ckpt.get("arch"), dict):
        return ckpt["arch"], None
    try:
        return models.infer_arch(state), None
    except UserError as e:
        name = saved_args(ckpt).get("model")
        if not isinstance(name, str):
            raise UserError(f"{e}; give --model NAME") from None
        logger.info("Model: --model %s, as saved in the checkpoint's args", name)
        return None, name


DEFAULT_INPUT_SIZE = 224  # the input size of a checkpoint that does not record one


@dataclass(frozen=True)
class Held:
    """What a checkpoint holds and how it was trained: the one answer main.py, pruning, the
    calibration and studies, inference, export and the benchmark use (`read_held`).

    ckpt: the checkpoint as read; state: its model weights; arch: a shape of ours (else None);
    name: else a registered model name; trained: the flags it was trained with ({} if none).
    """
    ckpt: Any
    state: dict
    arch: dict | None
    name: str | None
    trained: dict

    @property
    def label(self):
        """How messages name the model."""
        if self.arch is None:
            return self.name
        return models.registered_name(self.arch) or models.describe_arch(self.arch)

    @property
    def trained_epochs(self):
        """Epochs of training the checkpoint records (its last epoch + 1), or None."""
        epoch = self.ckpt.get("epoch") if isinstance(self.ckpt, dict) else None
        return epoch + 1 if isinstance(epoch, int) and not isinstance(epoch, bool) and epoch >= 0 else None

    @property
    def num_classes(self):
        """Classes of the weights (the arch's, the head's rows, else the trained --nb_classes)."""
        if self.arch is not None and "num_classes" in self.arch:
            return self.arch["num_classes"]
        head = models.head_weight(self.state)
        return head.shape[0] if head is not None else self.trained.get("nb_classes")

    @property
    def trained_input_size(self):
        """The --input_size it was trained at, or None when it records none."""
        size = self.trained.get("input_size")
        return size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else None

    def input_size(self, given=None):
        """`given`, else the trained input size, else DEFAULT_INPUT_SIZE."""
        return given or self.trained_input_size or DEFAULT_INPUT_SIZE

    def data_args(self, data_set=None, data_path=None, input_size=None):
        """The data flags it was trained with (data set, paths, class count, input size,
        transform), overridden where given; a new data set or path drops the saved paths."""
        t = self.trained
        keep_paths = data_set is None and data_path is None
        import datasets  # here: torchvision and timm's transforms load only when data is read
        return datasets.default_data_args(
            input_size=self.input_size(input_size), crop_pct=t.get("crop_pct"),
            imagenet_default_mean_and_std=t.get("imagenet_default_mean_and_std", True),
            data_set=data_set or t.get("data_set") or "DIGITS",
            data_path=data_path or (t.get("data_path") if keep_paths else None),
            eval_data_path=t.get("eval_data_path") if keep_paths else None,
            nb_classes=self.num_classes or 1000)

    def check_size(self, input_size, batch_size=1, training=False, device="cpu"):
        """Refuse an input size the model cannot run at, or whose activations exceed the
        device's memory; on a weightless (meta) copy, so nothing large is allocated."""
        with torch.device("meta"):
            probe = self.build()
        models.check_input_size(probe, input_size, self.label)
        models.check_memory(probe, input_size, batch_size, training, device)

    def build(self, **kwargs):
        """The model it holds, without weights (load them with load_model_state)."""
        if self.arch is not None:
            return models.build_model(self.arch, **kwargs)
        head = models.head_weight(self.state)
        return models.create_model(self.name, **({"num_classes": head.shape[0]} if head is not None else {}),
                                   **kwargs)


def read_held(ckpt, model_name=None, model_key="model|module", model_prefix=""):
    """Held for a loaded checkpoint (see model_state for the key / prefix, held_model for
    which model it names); weights in timm's layout are renamed into ours unless a stock timm
    model is named (given, or saved in the checkpoint's args), which reads its own."""
    state = model_state(ckpt, model_key, model_prefix)
    trained = saved_args(ckpt)
    name = model_name or trained.get("model")
    if not (isinstance(name, str) and models.is_stock_timm(name)):
        state = models.our_layout(state)
    arch, name = held_model(ckpt, state, model_name)
    return Held(ckpt, state, arch, name, trained)


def load_held_model(path, model_name=None, model_key="model|module"):
    """(the model a checkpoint file holds, its weights loaded; its Held)."""
    held = read_held(load_checkpoint_file(path), model_name, model_key)
    model = held.build()
    load_model_state(model, held.state, os.fspath(path))
    return model, held


def head_prefix(model):
    """Key prefix of the classifier: timm's get_classifier() where it exists, else `head.`."""
    get = getattr(model, "get_classifier", None)
    head = get() if callable(get) else None
    name = next((n for n, m in model.named_modules() if m is head), None) if head is not None else None
    return f"{name}." if name else "head."


def load_model_state(model, state_dict, what, drop_head_on_mismatch=False):
    """Load `state_dict` strictly into `model`; UserError naming each mismatching tensor.

    Args:
        what (str): where the weights come from, for messages ("--finetune x.pth").
        drop_head_on_mismatch (bool): fine-tuning: a head of another class count is dropped
            (the model keeps its fresh head) instead of being an error.
    """
    own = model.state_dict()
    state = dict(state_dict)
    if drop_head_on_mismatch:
        prefix = head_prefix(model)
        for k in [k for k in own if k.startswith(prefix)]:
            if k not in state or state[k].shape != own[k].shape:
                logger.info("Removing key %s from pretrained checkpoint (%s -> %s)", k,
                            list(state[k].shape) if k in state else "absent", list(own[k].shape))
                state[k] = own[k]  # the model keeps its fresh head
    models.check_arch_matches(model, state, what)
    model.load_state_dict(state, strict=True)


# ----------------------------------------------------------------------------- training state

def training_checkpoint(args, model, optimizer, loss_scaler, model_ema=None, epoch=None, **extra):
    """The official checkpoint dict (model, optimizer, epoch, scaler, args, EMA) plus our
    `arch` and any JSON-able extras (max_accuracy, ...)."""
    ckpt = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
            "scaler": loss_scaler.state_dict(), "args": args_to_dict(args), **extra}
    if getattr(model, "arch", None) is not None:
        ckpt["arch"] = model.arch
    if model_ema is not None:
        ckpt["model_ema"] = ema_module(model_ema).state_dict()
    return ckpt


def _top1_record(checkpoint, key, label):
    """A best top-1 a checkpoint records (0.0 when absent), refused unless a number in [0, 100]."""
    value = checkpoint.get(key, 0.0)
    value = value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 100:
        raise UserError(f"{label}: its {key} is {value!r}, not a top-1 in [0, 100]; the file is damaged "
                        "(a run resumed from it could never record a new best)")
    return float(value)


def restore_training(args, checkpoint, label, model_ema=None, optimizer=None, loss_scaler=None):
    """After the model weights are loaded: EMA, optimizer, scaler and the epoch to start at.

    Args:
        label (str): how messages name the checkpoint.
    Returns:
        dict with "max_accuracy" and "max_accuracy_ema" (0.0 when the checkpoint has none).
    """
    restored = {k: _top1_record(checkpoint, k, label) for k in ("max_accuracy", "max_accuracy_ema")}
    if model_ema is not None:
        ema_state = checkpoint.get("model_ema", checkpoint["model"])
        load_model_state(ema_module(model_ema), ema_state, f"model_ema of {label}")
    if optimizer is None or "optimizer" not in checkpoint or "epoch" not in checkpoint:
        return restored
    if not isinstance(checkpoint["epoch"], int):
        raise UserError(f"{label} is a '{checkpoint['epoch']}' checkpoint without a training "
                        "position; resume from a checkpoint-N.pth or use --finetune")
    try:
        optimizer.load_state_dict(checkpoint["optimizer"])
    except (ValueError, KeyError) as e:
        raise UserError(f"the optimizer state in {label} does not fit this run "
                        f"(different --opt or --layer_decay?): {e}") from None
    args.start_epoch = checkpoint["epoch"] + 1
    loss_scaler.load_state_dict(checkpoint.get("scaler") or {})
    logger.info("With optim & sched! Continuing at epoch %d", args.start_epoch)
    return restored

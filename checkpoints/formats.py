"""What a checkpoint file is, read off its bytes: a torch.save zip, a legacy pickle, or
safetensors; and whether its own structure says it is complete (a zip's CRCs, a safetensors
header). No code from a file runs here."""
import json
import os
import tarfile
import zipfile

from common.errors import UserError, first_line

SAFETENSORS_META = ("arch", "args", "pruning")  # entries kept as JSON in a safetensors file's metadata


def check_format(path, shown):
    """"zip" or "pickle" (torch.save), or "safetensors"; refuses files that are none of these,
    saying what they are."""
    with open(path, "rb") as f:
        head = f.read(9)
    if not head:
        raise UserError(f"{shown} is empty (0 bytes): not a checkpoint")
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    # safetensors first: its 8-byte header length starts with 0x80 (the pickle opcode) in about
    # one file in 32, and a pickle's 9th byte is never "{" (torch's magic number sits there)
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < os.path.getsize(path):
        return "safetensors"
    if head[:1] == b"\x80":  # torch.save's legacy format: a plain pickle
        return "pickle"
    if path.endswith(".safetensors"):  # damaged: load_safetensors says how
        return "safetensors"
    if tarfile.is_tarfile(path):
        raise UserError(f"{shown} is in the legacy tar format of PyTorch before 0.4, which cannot "
                        "be read safely: load it with that PyTorch and save it again")
    raise UserError(f"{shown} is not a PyTorch checkpoint (neither a torch.save file nor safetensors)")


def check_structure(path, shown):
    """Refuse a file whose own structure says it is incomplete or damaged; returns its format."""
    kind = check_format(path, shown)
    if kind == "safetensors":
        load_safetensors(path, shown, "cpu")
    elif kind == "zip":
        check_zip(path, shown)
    return kind


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


def load_safetensors(path, shown, map_location):
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

"""Atomic writes: a kill at any instant leaves the old file or the complete new one.

Every writer of the project (checkpoints, logs, study rows and tables, exports) goes through
`atomic_path` / `atomic_open`: a temp file `.tmp-<name>-<random>` in the target's folder, fsync,
rename onto the target. A temp file is removed when the block fails.
"""
import contextlib
import hashlib
import os
import tempfile

TEMP_PREFIX = ".tmp-"  # temp names: .tmp-<target name>-<random><suffix>


@contextlib.contextmanager
def atomic_path(path, suffix=""):
    """Yield a temp path to write; on success it is fsynced and renamed onto `path`.

    Args:
        path: the file to (re)place; its folder is created when missing.
        suffix: ending of the temp name (e.g. ".onnx" for writers that check it).
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{os.path.basename(path)}-", suffix=suffix, dir=folder)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; a plain open would honour the umask
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_open(path, mode="w", encoding="utf-8"):
    """`open` for writing through `atomic_path` (text by default, "wb" for bytes)."""
    with atomic_path(path) as tmp:
        with open(tmp, mode, encoding=None if "b" in mode else encoding) as f:
            yield f


def sha256_file(path):
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()

"""Atomic writes: a kill at any instant leaves the old file or the complete new one.

Every writer of the project (checkpoints, logs, study rows and tables, exports) goes through
`atomic_path` / `atomic_open`: a temp file `.tmp-<name>-<random>` in the target's folder, fsync,
rename onto the target. A temp file is removed when the block fails. `hold_lock` is the one
run lock of a folder (training runs, studies): one process at a time writes in it.
"""
import atexit
import contextlib
import errno
import fcntl
import hashlib
import os
import stat
import socket
import tempfile

from common.errors import UserError

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


def check_output_file(path, flag, overwrite=False):
    """Refuse an output file before any work: no name, a folder, an existing file without
    `overwrite`, a missing or read-only folder, a name too long for the file system (with
    the temp prefix the atomic write adds). A link is never followed: the write replaces it."""
    if not path:
        raise UserError(f"{flag}: give a file name (it is empty)")
    if os.path.isdir(path):
        raise UserError(f"{flag} {path} is a folder; give a file name")
    if os.path.lexists(path) and not (stat.S_ISREG(os.lstat(path).st_mode) or os.path.islink(path)):
        raise UserError(f"{flag} {path} is not a regular file (a pipe, socket or device): it is never "
                        "replaced; give a file name")
    if os.path.lexists(path) and not overwrite:
        raise UserError(f"{flag} {path} exists; pass --overwrite to replace it")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(f"{flag} {path}: its folder does not exist")
    try:  # a real write: permissions, a read-only file system, root in a protected place
        with tempfile.NamedTemporaryFile(dir=folder, prefix=TEMP_PREFIX):
            pass
    except OSError as e:
        raise UserError(f"{flag} {path}: its folder is not writable ({e.strerror})") from None
    if len(os.fsencode(os.path.basename(path))) + len(TEMP_PREFIX) + 16 > os.pathconf(folder, "PC_NAME_MAX"):
        raise UserError(f"{flag}: the file name is too long for this file system")


LOCK_NAME = ".run.lock"  # a folder's run lock (hold_lock); the file may stay, the lock does not
_HELD = {}  # lock path (its folder resolved) -> (the open lock file, whether this process created
# it): the kernel drops the lock when the process ends


def _lock_key(folder, name):
    return os.path.join(os.path.realpath(folder), name)


def hold_lock(folder, what, name=LOCK_NAME, thing=None):
    """Hold `folder`'s run lock (flock on `name`) for the life of this process, creating the
    folder. A second process is refused with a UserError naming the holder; a holder that
    dies, however it dies, leaves no lock behind (the file of a killed one may stay; a holder
    that exits removes the file it created). `thing`: what messages name (default the folder)."""
    key = _lock_key(folder, name)
    if key in _HELD:
        return
    path = os.path.join(folder, name)
    try:
        os.makedirs(folder, exist_ok=True)
        while True:
            created = not os.path.lexists(path)
            f = _open_lock(path, what, folder)
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "another process"
                f.close()
                raise UserError(f"{what} {thing or folder} is in use by another run ({holder}); wait for it "
                                f"to end, or give another {'file' if thing else 'folder'}") from None
            if os.path.exists(path) and os.stat(path).st_ino == os.fstat(f.fileno()).st_ino:
                break
            f.close()  # its holder removed the file as we opened it: lock the new one
    except OSError as e:
        raise UserError(f"{what} {folder}: cannot create or write in it ({e.strerror})") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    if not _HELD:
        atexit.register(_drop_all)
    _HELD[key] = (f, created)


def _open_lock(path, what, folder):
    """The lock file, opened without following a link (a link's target is never written) and
    refused unless it is a regular file; one hard-linked into another folder (a `cp -al` copy)
    is first replaced by a fresh file of this folder's own."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UserError(f"{what} {folder}: its {LOCK_NAME} is a symbolic link; remove it (a run never "
                            "writes through a link)") from None
        raise
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise UserError(f"{what} {folder}: its {LOCK_NAME} is not a regular file; remove it")
    if info.st_nlink > 1:  # shared with a copy's lock: this folder gets its own
        os.close(fd)
        with atomic_path(path) as tmp:
            open(tmp, "w").close()
        return _open_lock(path, what, folder)
    return open(path, "r+", encoding="utf-8", opener=lambda *_: fd)  # named by its path


def drop_lock(folder, name=LOCK_NAME):
    """Give the lock up (a refused run, or at exit), removing the file if this process created
    it, so the folder is left as it was found."""
    f, created = _HELD.pop(_lock_key(folder, name), (None, False))
    if f is None:
        return
    if created:
        with contextlib.suppress(OSError):
            os.remove(f.name)  # while still holding it (hold_lock checks the inode it locked)
    f.close()


def _drop_all():
    for key in list(_HELD):
        drop_lock(*os.path.split(key))

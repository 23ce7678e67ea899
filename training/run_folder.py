"""The files a training run keeps in --output_dir: checkpoints, their rotation, log.txt.

Rules (a kill at any instant loses at most the epoch in progress; nothing foreign is touched):
- A run owns the files it wrote plus those of the run it resumed (each checkpoint lists them
  under `run`). It never overwrites, rotates away or appends to a file it does not own: a
  folder holding another run's files is refused before training starts.
- Per epoch, the best checkpoint is written before checkpoint-N.pth, and checkpoint-N.pth
  (the commit point of the epoch) carries every log line so far. Resuming from it rewrites
  log.txt from those lines, so no line is lost and none is doubled.
- Temp files of interrupted writes (ours, by name) are removed when training starts.
"""
import json
import logging
import os
from dataclasses import dataclass
import re
import shutil
import uuid

from checkpoints.io import load_checkpoint_file, save_checkpoint_file, save_weights_file
from common.errors import UserError
from common.files import TEMP_PREFIX, atomic_open

logger = logging.getLogger(__name__)

LOG = "log.txt"
_EPOCH = re.compile(r"checkpoint-(\d+)\.pth")
_OURS = re.compile(r"checkpoint-.*\.(pth|safetensors)|log\.txt")
_TEMP = re.compile(re.escape(TEMP_PREFIX) + r"(checkpoint-.+\.(pth|safetensors)-\w+|\w{8}\.pth)")
WEIGHTS_SUFFIX = ".safetensors"  # --save_format safetensors: a weights-only twin of each best checkpoint


def list_epoch_checkpoints(output_dir):
    """Sorted [(epoch, path)] of the checkpoint-N.pth files in `output_dir`."""
    if not output_dir or not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), os.path.join(output_dir, name)) for name in os.listdir(output_dir)
             if (m := _EPOCH.fullmatch(name))]
    return sorted(found)


@dataclass(frozen=True)
class ResumePoint:
    """The checkpoint a run resumes from: the one --resume names, or the newest checkpoint-N.pth
    that --auto_resume picked in --output_dir (auto); path None: nothing to resume."""
    path: str | None = None
    auto: bool = False

    @property
    def label(self):
        """How messages name it (saying so when auto-resume chose it)."""
        if self.auto:
            return (f"{self.path} (picked by auto-resume from --output_dir; start afresh with another "
                    "--output_dir, or --auto_resume false)")
        return f"--resume {self.path}"


def resolve_resume(resume, auto_resume, output_dir):
    """The ResumePoint of the flags --resume, --auto_resume and --output_dir."""
    if auto_resume and not resume and output_dir:
        found = list_epoch_checkpoints(output_dir)
        if found:
            logger.info("Auto resume checkpoint: %s", found[-1][1])
            return ResumePoint(found[-1][1], auto=True)
    return ResumePoint(resume or None)


def _same_folder(path, folder):
    try:
        return os.path.samefile(os.path.dirname(os.path.abspath(path)), folder)
    except OSError:
        return False


class RunFolder:
    """The files of one training run (and the runs it resumed) in `output_dir`.

    Args:
        output_dir (str): the run's folder (created if absent).
        resumed (dict | None): the loaded --resume checkpoint.
        resume_path (str | None): its path.
        restart (bool): a fresh start may take over the best checkpoint of a run of ours that
            was killed before it completed any epoch (auto-resume: there is nothing to resume,
            so the run starts again).
    """

    def __init__(self, output_dir, resumed=None, resume_path=None, restart=False):
        self.dir, self.restart = output_dir, restart and resumed is None
        run = resumed.get("run") if isinstance(resumed, dict) else None
        run = run if isinstance(run, dict) else {}
        self.id = run.get("id") or uuid.uuid4().hex
        self.history = list(resumed.get("log_history") or []) if isinstance(resumed, dict) else []
        self.owned = set()
        if resumed is not None and resume_path and _same_folder(resume_path, output_dir):
            self.owned = set(run.get("files") or self._legacy_files(resumed))

    def _legacy_files(self, resumed):
        """A checkpoint from before run records: the run owned every checkpoint up to its
        epoch, the best ones and the log (the official auto-resume convention)."""
        epoch = resumed.get("epoch")
        last = epoch if isinstance(epoch, int) else -1
        return {n for n in self._names() if not (m := _EPOCH.fullmatch(n)) or int(m.group(1)) <= last}

    def _names(self):
        return [n for n in os.listdir(self.dir) if _OURS.fullmatch(n)] if os.path.isdir(self.dir) else []

    def check(self, start_epoch):
        """Refuse to start if a file this run would write or append to belongs to another run."""
        if os.path.exists(self.dir) and not os.path.isdir(self.dir):
            raise UserError(f"--output_dir {self.dir} is a file, not a folder")
        conflicts = []
        for name in sorted(self._names()):
            m = _EPOCH.fullmatch(name)
            if name in self.owned or (m and int(m.group(1)) < start_epoch):
                continue  # ours, or an older foreign checkpoint this run never touches
            if not m and name != LOG and self._ours(name):
                self.owned.add(name)  # a best checkpoint written just before a kill
                continue
            conflicts.append(name)
        if conflicts:
            shown = ", ".join(conflicts[:4]) + (f" (+{len(conflicts) - 4} more)" if len(conflicts) > 4 else "")
            raise UserError(f"--output_dir {self.dir} already holds {shown} from another run (or "
                            f"newer than the checkpoint resumed); this run would overwrite or "
                            "mix with them: use an empty --output_dir, or resume that run "
                            "(--auto_resume true, or --resume its newest checkpoint)")
        self.owned.add(LOG)

    def _ours(self, name):
        """A best checkpoint of this run, or of a run of ours killed in its first epoch that
        this fresh start restarts (no epoch checkpoint in the folder); a weights twin is ours
        when its .pth is."""
        if name.endswith(WEIGHTS_SUFFIX):
            twin = name[:-len(WEIGHTS_SUFFIX)] + ".pth"
            return twin in self.owned or (os.path.isfile(os.path.join(self.dir, twin)) and self._ours(twin))
        try:
            ckpt = load_checkpoint_file(os.path.join(self.dir, name), mmap=True)
        except UserError:
            return False
        run = ckpt.get("run") if isinstance(ckpt, dict) else None
        if not isinstance(run, dict):
            return False
        return run.get("id") == self.id or (self.restart and not list_epoch_checkpoints(self.dir))

    def prepare(self):
        """Create the folder, remove our orphan temp files, restore log.txt (main process only)."""
        os.makedirs(self.dir, exist_ok=True)
        orphans = [n for n in os.listdir(self.dir) if _TEMP.fullmatch(n)]
        size = sum(os.path.getsize(os.path.join(self.dir, n)) for n in orphans)
        for name in orphans:
            os.remove(os.path.join(self.dir, name))
        if orphans:
            logger.info("Removed %d temp files of interrupted checkpoint writes (%.1f MB)",
                        len(orphans), size / 1e6)
        if self.history:
            self._write_log(self.history, mode="w")

    def _write_log(self, rows, mode):
        path = os.path.join(self.dir, LOG)
        text = "".join(json.dumps(r) + "\n" for r in rows)
        if mode == "w":
            with atomic_open(path) as f:
                f.write(text)
            return
        with open(path, "a", encoding="utf-8") as f:  # one appended line per epoch
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    def save(self, ckpt, name):
        """Write checkpoint `name` with the run record and the log lines so far."""
        self.owned.add(name)
        record = {"run": {"id": self.id, "files": sorted(self.owned)}, "log_history": self.history}
        save_checkpoint_file({**ckpt, **record}, os.path.join(self.dir, name))

    def check_space(self, checkpoint_bytes):
        """Refuse to train when the folder's file system cannot hold the next writes: a new
        checkpoint beside the old one while it is written, and a best checkpoint."""
        free = shutil.disk_usage(self.dir).free
        if free < 3 * checkpoint_bytes:
            raise UserError(f"--output_dir {self.dir} has {free / 2 ** 20:,.0f} MiB free; each checkpoint "
                            f"of this run takes about {checkpoint_bytes / 2 ** 20:,.0f} MiB and a run needs "
                            "room for three (the epoch's, the one being written, the best)")

    def save_weights(self, ckpt, name):
        """Write the weights-only safetensors file `name` (checkpoint.save_weights_file)."""
        self.owned.add(name)
        save_weights_file(ckpt, os.path.join(self.dir, name))

    def rotate(self, keep):
        """Delete all but the newest `keep` epoch checkpoints this run owns (keep 0: none deleted)."""
        if keep < 1:
            return
        mine = [(e, p) for e, p in list_epoch_checkpoints(self.dir) if os.path.basename(p) in self.owned]
        for _, path in mine[:-keep]:
            os.remove(path)
            self.owned.discard(os.path.basename(path))

    def log(self, stats):
        """Add the epoch's line to the history (saved with the next checkpoint)."""
        self.history.append(stats)

    def flush_log(self):
        """Append the newest line to log.txt (after the epoch's checkpoint is written)."""
        if self.history:
            self._write_log(self.history[-1:], mode="a")

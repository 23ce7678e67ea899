"""What the pruning studies share (scripts/compare_criteria.py, pruning/sensitivity.py,
pruning/iterative.py): the evaluation set held in memory, cell specs parsed by prune.py's own
parser (pruning/cli.py) and pruned in memory by pruning.prune, and a results file that survives
kills.

A study folder holds `study.json` (the settings that define the rows) and `results.jsonl`
(one finished row per line, flushed and fsynced). Rerunning the same command in the same
folder skips the rows already there, so a killed study loses at most the row in progress;
different settings in the same folder are refused instead of mixed.
"""
import contextlib
import ctypes
import fcntl
import json
import math
import os
import shlex
import signal
import statistics
import subprocess
import sys

import torch

import datasets
import models
from engine import evaluate
from checkpoints.sources import check_source, set_download_timeout
from common.config import Range
from common.errors import UserError, first_line
from common.files import LOCK_NAME, atomic_open, atomic_path, drop_lock, hold_lock

from cli import prune as cli
from pruning import api
from pruning.calibration import stacked_batches
from pruning.criteria import get_criterion

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def check_common(args):
    """The checks every study shares: the source file, the folder, --seeds, --eval_subset."""
    set_download_timeout(args.download_timeout)
    check_source(args.checkpoint, f"--checkpoint {args.checkpoint}")
    if os.path.isfile(args.output_dir):
        raise UserError(f"--output_dir {args.output_dir} is a file")
    seeds = getattr(args, "seeds", None)
    if seeds is not None and (len(set(seeds)) != len(seeds) or min(seeds) < 0):
        raise UserError("--seeds must be distinct non-negative integers")
    subset = getattr(args, "eval_subset", None)
    problem = None if subset is None else Range(1, integer=True)(subset)
    if problem:
        raise UserError(f"--eval_subset {problem}")


def open_source(checkpoint):
    """(the api.Source of a study's checkpoint, its input size)."""
    source = api.open_source(checkpoint)
    return source, source.held.input_size()


def die_with_parent(parent=os.getpid()):
    """In a study's child before it runs: killed when the study dies, however it dies (Linux
    PR_SET_PDEATHSIG), so no orphan main.py writes on into a folder a rerun then uses."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the study died before the call above
        os._exit(1)


def finetune(start, out, epochs, data, train_args, what, extra=(), launcher=()):
    """main.py --finetune `start` into `out` (auto-resumed after a kill) with the data flags,
    `extra` and the pass-through recipe (`launcher`: python flags before main.py, e.g.
    torchrun's); (its last checkpoint, top-1). One line if it fails."""
    cmd = [sys.executable, *launcher, os.path.join(ROOT, "main.py"), "--finetune", start, "--output_dir", out,
           "--epochs", str(epochs), "--data_set", data.data_set, "--input_size", str(data.input_size),
           *(["--data_path", data.data_path] if data.data_path else []), *extra, *shlex.split(train_args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=die_with_parent)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise UserError(f"{what} failed: {tail[0]}")
    return os.path.join(out, f"checkpoint-{epochs - 1}.pth"), last_top1(out)


class Evaluator:
    """Top-1 of a (pruned) state dict on the evaluation split, or a fixed subset of it.

    Args:
        args: data flags (checkpoint.Held.data_args).
        subset: evaluate on this many images, a fixed seeded choice (None: all).
        batch_size: images per forward pass.
    """

    def __init__(self, args, subset=None, batch_size=128):
        dataset, _ = datasets.build_dataset(is_train=False, args=args)
        index = list(range(len(dataset)))
        if subset is not None:
            if subset > len(dataset):
                raise UserError(f"--eval_subset {subset}: the evaluation split has only {len(dataset)} images")
            index = sorted(torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:subset].tolist())
        self.images = len(index)
        self.batches = stacked_batches(dataset, index, batch_size)

    def accuracy(self, arch, state_dict):
        return evaluate(self.batches, models.with_weights(arch, state_dict), torch.device("cpu"), print_freq=10 ** 9)["acc1"]


SCORING_FLAGS = ("scope", "normalize", "reduce", "raw_weights", "calib_batches", "calib_batch_size", "compensate")


def criterion_argv(spec):
    """NAME[:flag=value,...] -> prune.py flags; UserError for an unknown name or flag."""
    name, _, extra = spec.partition(":")
    get_criterion(name)
    argv = ["--criterion", name]
    for item in filter(None, extra.split(",")):
        flag, sep, value = item.partition("=")
        if flag not in SCORING_FLAGS:
            raise UserError(f"criterion {spec!r}: {flag!r} is not a scoring flag ({', '.join(SCORING_FLAGS)})")
        if flag == "raw_weights":
            if value not in ("", "true", "false"):
                raise UserError(f"criterion {spec!r}: raw_weights takes true or false")
            argv += ["--raw_weights"] if value in ("", "true") else []
        elif not sep:
            raise UserError(f"criterion {spec!r}: expected {flag}=VALUE")
        else:
            argv += [f"--{flag}", value]
    return argv


def _compensates(criterion_args):
    """Whether the cell compensates after the cut (which reads calibration images)."""
    i = criterion_args.index("--compensate") if "--compensate" in criterion_args else None
    return i is not None and criterion_args[i + 1] != "none"


def uses_seed(criterion_args):
    """Whether --seed changes the cell (the criterion's draws or calibration images, or the
    images a compensation fits on)."""
    return get_criterion(criterion_args[1]).uses_seed or _compensates(criterion_args)


def seed_flags(criterion_args, seed):
    """prune.py's --seed for a criterion whose scores depend on it, else none."""
    return ["--seed", str(seed)] if uses_seed(criterion_args) else []


def calibration_flags(criterion_args, data_set, data_path):
    """prune.py's data flags for a data-driven criterion or a compensation (the study's data),
    else none."""
    if get_criterion(criterion_args[1]).evidence is None and not _compensates(criterion_args):
        return []
    return (["--data_set", data_set] if data_set else []) + (["--data_path", data_path] if data_path else [])


# main.py flags a study sets itself for every fine-tuning it runs
MAIN_FLAGS_SET = ("--finetune", "--resume", "--output_dir", "--epochs", "--teacher", "--eval", "--data_set",
                  "--data_path", "--input_size", "--kd_alpha", "--kd_temperature", "--seed", "--disable_eval")


def split_flags(text, flag):
    """A flag's shell-quoted text as argv, one line for a quote left open."""
    try:
        return shlex.split(text)
    except ValueError as e:
        raise UserError(f"{flag} {text!r}: {e} (quote it as in a shell)") from None


def check_train_args(text, known, allowed=()):
    """Refuse main.py flags in --train_args that the study sets itself (or needs unset), in
    any spelling (`--seed=7`), and abbreviations (argparse would read `--epoch` as --epochs).

    Args:
        known: main.py's option strings.
        allowed: flags of MAIN_FLAGS_SET this study lets through.
    """
    for token in split_flags(text, "--train_args"):
        if not token.startswith("--"):
            continue
        name = token.split("=", 1)[0]
        if name not in known:
            whole = [o for o in known if o.startswith(name)]
            raise UserError(f"--train_args: {name} is not a main.py flag"
                            + (f" (it abbreviates {', '.join(whole)}: write flags in full)" if whole else ""))
        if name in MAIN_FLAGS_SET and name not in allowed:
            raise UserError(f"--train_args: {name} is set by this tool; leave it out")


def last_top1(folder):
    """Top-1 of the last epoch main.py logged in `folder`."""
    with open(os.path.join(folder, "log.txt")) as f:
        last = json.loads(f.read().strip().splitlines()[-1])
    if "test_acc1" not in last:
        raise UserError(f"{folder}/log.txt has no evaluation; the fine-tuning must evaluate")
    return last["test_acc1"]


def cell_spec(checkpoint, argv):
    """The resolved PruneSpec of one study cell: prune.py's flags, checked as its command line is."""
    args = cli.get_args_parser().parse_args(["--checkpoint", checkpoint, "--dry_run", *argv])
    return cli.check_args(args).resolved()


def prune_cell(source, spec, evidence):
    """The pruned checkpoint of one cell; `evidence` caches each (criterion, seed)'s calibration
    ({key: Evidence}, holding one entry at a time)."""
    key = (spec.criterion.name, spec.seed, spec.calibration)
    if key not in evidence:
        evidence.clear()
        evidence[key] = api.calibrate(spec, source)
    return api.prune(source, spec, evidence=evidence[key]).checkpoint


def _integer(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _top1(v):
    return v is None or (_number(v) and 0 <= v <= 100)


# What each field of a study row holds: (test, description); rows are checked when read.
ROW_FIELDS = {
    **{k: (lambda v: isinstance(v, str) and bool(v), "a non-empty string")
       for k in ("criterion", "budget", "set", "snapshot", "step")},
    "seed": (_integer, "an integer"),
    "round": (lambda v: v == "distill" or (_integer(v) and v >= 1), 'a round number or "distill"'),
    **{k: (lambda v: _integer(v) and v >= 0, "a count >= 0") for k in ("params", "macs")},
    "ratio": (lambda v: _number(v) and 0 <= v <= 1, "a number in [0, 1]"),
    **{k: (_top1, "a top-1 in [0, 100] or null") for k in ("acc", "acc_pruned", "acc_finetuned")},
    "seconds": (lambda v: _number(v) and v >= 0, "a number >= 0"),
}


class Results:
    """The rows of a study folder, keyed by their identifying fields, each checked when read
    (`fields`: what every row holds, tested by ROW_FIELDS). The folder is locked for the
    life of the process (files.hold_lock)."""

    def __init__(self, folder, settings, key_fields, fields):
        self.path = os.path.join(folder, "results.jsonl")
        self.key_fields, self.fields = key_fields, fields
        hold_lock(folder, "--output_dir")
        try:
            self._open(folder, settings)
        except UserError:
            drop_lock(folder)
            raise

    def _open(self, folder, settings):
        settings_path = os.path.join(folder, "study.json")
        if os.path.exists(settings_path):
            held = _read_json(settings_path)
            if held != json.loads(json.dumps(settings)):
                raise UserError(f"{folder} holds a study with other settings ({settings_path}); "
                                "give another --output_dir, or the same settings to resume it")
        elif os.path.exists(self.path) or set(os.listdir(folder)) - {LOCK_NAME}:
            raise UserError(f"{folder} is not empty and holds no study of this tool; give another --output_dir")
        else:
            write_json(settings_path, settings)
        self.rows = self._read()

    def _read(self, rewrite=True):
        if not os.path.exists(self.path):
            return []
        with row_lock(self.path):
            return self._read_locked(rewrite)

    def reload(self):
        """Read the rows again (jobs of --launcher slurm append them from other processes)."""
        self.rows = self._read(rewrite=False)

    def _read_locked(self, rewrite):
        lines = _read_text(self.path).splitlines()
        rows, seen = [], {}
        for n, line in enumerate(lines, start=1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                if n == len(lines):
                    break  # the line a kill cut short: that row is run again
                raise UserError(f"{self.path} line {n} is not JSON: the folder is damaged") from None
            self._check(row, n)
            key = self.key(row)
            if key in seen:
                raise UserError(f"{self.path} line {n} repeats the row of line {seen[key]} ({key})")
            seen[key] = n
            rows.append(row)
        if rewrite:  # drop a cut line so appends stay line-aligned
            with atomic_open(self.path) as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
        return rows

    def _check(self, row, n):
        if not isinstance(row, dict):
            raise UserError(f"{self.path} line {n} is not a row (a JSON object)")
        for field in self.fields:
            if field not in row:
                raise UserError(f"{self.path} line {n} has no {field!r}")
            test, what = ROW_FIELDS[field]
            if not test(row[field]):
                raise UserError(f"{self.path} line {n}: {field} is {row[field]!r}, not {what}")

    def key(self, row):
        return tuple(row[k] for k in self.key_fields)

    def has(self, **fields):
        return self.key(fields) in {self.key(r) for r in self.rows}

    def add(self, row):
        if append_row(self.path, self.key_fields, row):
            self.rows.append(row)
        else:  # another process (a job of the same study) wrote it first
            self.reload()


@contextlib.contextmanager
def row_lock(path):
    """An exclusive lock on a results file (its `.lock` twin: a rewrite replaces the file)."""
    with open(f"{path}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _drop_cut_tail(path):
    """Cut a last line that a writer killed mid-write left without its newline (the lock is
    held: no live writer is in the middle of it)."""
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


def append_row(path, key_fields, row):
    """Append one row (a JSON line, flushed and fsynced) unless a row with its key is there:
    jobs of one study append from other processes, and a retried job must not write twice."""
    key = tuple(row[k] for k in key_fields)
    with row_lock(path):
        if os.path.exists(path):
            _drop_cut_tail(path)
            for line in _read_text(path).splitlines():
                try:
                    held = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(held, dict) and tuple(held.get(k) for k in key_fields) == key:
                    return False
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
    return True


def _read_text(path):
    """A study file's text; one line when it is a folder, unreadable or not UTF-8."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path}: {getattr(e, 'strerror', None) or first_line(e)}") from None


def _read_json(path):
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError:
        raise UserError(f"{path} is not JSON: the study folder is damaged") from None


def write_json(path, data):
    with atomic_open(path) as f:
        json.dump(data, f, indent=1)


def mean_sd(values):
    """(mean, sample standard deviation or 0 for one value, n)."""
    values = [float(v) for v in values]
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return statistics.fmean(values), sd, len(values)


def write_table(path, header, rows):
    """A CSV file (plain values, no quoting needed)."""
    with atomic_open(path) as f:
        f.write(",".join(header) + "\n")
        for r in rows:
            f.write(",".join("" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)
                             for v in r) + "\n")


def pyplot():
    """matplotlib's pyplot with a file-only backend."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def finish_plot(plt, fig, ax, source_acc, xlabel, path, **legend):
    """The parts every study plot shares: the source's accuracy, labels, legend, grid; saved."""
    ax.axhline(source_acc, color="black", linewidth=0.8, linestyle=":", label="source")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("top-1 right after pruning (%)")
    ax.legend(**legend)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path, suffix=os.path.splitext(path)[1]) as tmp:  # replaces a link, never writes through it
        fig.savefig(tmp, dpi=120)
    plt.close(fig)

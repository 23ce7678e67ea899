"""Where a study's cells run: one after another in this process (`--launcher local`), or each
as a submitit job (`--launcher slurm`: SLURM where `sbatch` exists, else submitit's local
executor, real subprocesses of this machine).

A job rebuilds what its cell needs (the source, the evaluation data) from the study's flags,
computes its row and appends it to the study's results.jsonl itself (study.append_row: under
a file lock, fsynced, and only if no row with its key is there, so a retried or duplicated job
cannot write it twice). The parent submits at most --max_parallel jobs at a time, prints each
finished row, retries a failed or pre-empted job --retries times, and reports a cell that still
fails with its log; the study folder alone holds the state, so a study can be resumed by
another parent, on another login node.
"""
import os
import time
from dataclasses import dataclass
from typing import Any, Callable

from common.config import Range
from common.errors import ArgumentParser, UserError
from cli.flags import add_download_flag

LAUNCHERS = ("local", "slurm")
SLURM_DEFAULTS = {"slurm_partition": None, "slurm_time": 60, "gpus_per_cell": 1, "max_parallel": 8, "retries": 1}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def study_parser(name, doc):
    """The flags every study takes (--checkpoint, --output_dir) in a parser of its own
    (importable without torch: the studies' --help)."""
    p = ArgumentParser(name, description=doc)
    p.add_argument("--checkpoint", required=True, help="the trained source checkpoint")
    p.add_argument("--output_dir", required=True, help="study folder (created; reused to resume)")
    add_download_flag(p)
    return p


def add_flags(parser):
    """The launcher flags every study tool takes."""
    a = parser.add_argument
    a("--launcher", default="local", choices=LAUNCHERS,
      help="local: cells one after another in this process; slurm: one submitit job per cell "
           "(submitit's local executor where there is no SLURM)")
    a("--slurm_partition", default=None, help="slurm: the partition of the jobs")
    a("--slurm_time", type=int, default=None, help="slurm: minutes a job may run (default 60)")
    a("--gpus_per_cell", type=int, default=None,
      help="slurm: GPUs of each job (default 1); a fine-tuning runs under torchrun when > 1")
    a("--max_parallel", type=int, default=None, help="slurm: jobs running at once (default 8)")
    a("--retries", type=int, default=None, help="slurm: resubmissions of a failed job (default 1)")


def check_flags(args):
    """Refuse slurm flags without --launcher slurm; fill their defaults and check ranges."""
    given = [f"--{k}" for k in SLURM_DEFAULTS if getattr(args, k) is not None]
    if args.launcher == "local" and given:
        raise UserError(f"{', '.join(given)} apply to --launcher slurm; --launcher local runs the cells "
                        "in this process")
    for key, default in SLURM_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, default)
    for key, low in (("slurm_time", 1), ("gpus_per_cell", 0), ("max_parallel", 1), ("retries", 0)):
        problem = Range(low, integer=True)(getattr(args, key))
        if problem:
            raise UserError(f"--{key} {problem}")


def torchrun(gpus):
    """The launcher prefix of a fine-tuning inside a job: torchrun when it has > 1 GPU."""
    return ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(gpus)] if gpus > 1 else []


@dataclass
class CellJob:
    """What one submitit job runs: build the context, compute the row, append it."""
    context: Callable          # (args) -> the tool's shared state (source, evaluator, ...)
    compute: Callable          # (ctx, args, cell) -> row
    args: Any
    cell: Any
    results_path: str
    key_fields: tuple

    def __call__(self):
        from studies.study import append_row
        row = self.compute(self.context(self.args), self.args, self.cell)
        append_row(self.results_path, self.key_fields, row)
        return row


def _executor(args, folder, name):
    import submitit
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    executor = submitit.AutoExecutor(folder=os.path.join(folder, "jobs", "%j"))
    gpus = args.gpus_per_cell
    if executor.cluster != "slurm":
        import torch
        gpus = min(gpus, torch.cuda.device_count())
        print(f"--launcher slurm: no SLURM here ({executor.cluster} executor); each cell is a job run as "
              "a subprocess of this machine", flush=True)
    params = dict(name=name, timeout_min=args.slurm_time, gpus_per_node=gpus, tasks_per_node=1, nodes=1)
    if executor.cluster == "slurm":
        params.update(slurm_setup=[f"export PYTHONPATH={ROOT}:$PYTHONPATH"],
                      **({"slurm_partition": args.slurm_partition} if args.slurm_partition else {}))
    executor.update_parameters(**params)
    return executor


def run_cells(args, results, cells, context, compute, say, name="study", ctx=None):
    """Compute every cell's row (cells: [(key dict, cell)], those not in `results`), locally
    (with `ctx`, else context(args)) or as jobs (each builds context(args)); `say(n, total,
    row)` reports each finished one. Raises UserError naming the cells that failed, after the
    others finished."""
    todo = [(key, cell) for key, cell in cells if not results.has(**key)]
    if args.launcher == "local":
        ctx = ctx if ctx is not None or not todo else context(args)
        for n, (_, cell) in enumerate(todo, start=1):
            row = compute(ctx, args, cell)
            results.add(row)
            say(n, len(todo), row)
        return
    _run_jobs(args, results, todo, context, compute, say, name)


def _run_jobs(args, results, todo, context, compute, say, name):
    executor = _executor(args, args.output_dir, name)
    waiting, running, failed, finished = list(todo), [], [], 0
    attempts = {}
    while waiting or running:
        while waiting and len(running) < args.max_parallel:
            key, cell = waiting.pop(0)
            job = executor.submit(CellJob(context, compute, args, cell, results.path, results.key_fields))
            attempts[id(cell)] = attempts.get(id(cell), 0) + 1
            running.append((key, cell, job))
        time.sleep(0.5)
        for item in [r for r in running if r[2].done()]:
            running.remove(item)
            key, cell, job = item
            try:
                row = job.result()
            except Exception as e:  # the job failed, was killed or pre-empted
                if attempts[id(cell)] <= args.retries:
                    print(f"job {job.job_id} ({_key_text(key)}) failed ({_why(e)}); resubmitting", flush=True)
                    waiting.append((key, cell))
                else:
                    failed.append(f"{_key_text(key)}: {_why(e)} (log: {job.paths.stderr})")
                continue
            finished += 1
            say(finished, len(todo), row)
    results.reload()
    if failed:
        raise UserError(f"{len(failed)} cell(s) failed after {args.retries + 1} attempt(s): {'; '.join(failed)}")


def _why(e):
    """The last line of a job's failure (submitit carries the job's traceback in the message)."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    return (lines[-1] if lines else type(e).__name__)[:300]


def _key_text(key):
    return ", ".join(f"{k} {v}" for k, v in key.items())

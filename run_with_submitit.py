"""Submit main.py to a SLURM cluster with submitit (as the official repo; see TRAINING.md).

    (submitit is in requirements.txt)
    python run_with_submitit.py --nodes 4 --ngpus 8 --model convnext_tiny --drop_path 0.1 \
        --batch_size 128 --lr 4e-3 --update_freq 1 --model_ema true --model_ema_eval true \
        --data_path /path/to/imagenet-1k --job_dir /path/to/save_results

Every main.py flag is accepted. Preempted or timed-out jobs are requeued and continue from
the newest checkpoint in --job_dir (auto-resume).
"""
import os
import sys
import uuid
from pathlib import Path

from cli import options
from common.errors import UserError, run_cli


def get_args_parser():
    parser = options.ArgumentParser("Submitit for ConvNeXt",
                                    parents=[options.get_args_parser()])
    a = parser.add_argument
    a("--ngpus", default=8, type=int, help="Number of gpus to request on each node")
    a("--nodes", default=2, type=int, help="Number of nodes to request")
    a("--timeout", default=72, type=int, help="Duration of the job, in hours")
    a("--job_name", default="convnext", type=str, help="Job name")
    a("--job_dir", default="", type=str, help="Job directory; leave empty for the shared folder")
    a("--partition", default="learnlab", type=str, help="Partition where to submit")
    a("--use_volta32", type=options.str2bool, nargs="?", const=True, default=False,
      help="Ask for 32 GB V100s (slurm constraint volta32gb); the official script always did")
    a("--constraint", default="", type=str, help="Any other SLURM constraint")
    a("--comment", default="", type=str, help="Comment to pass to scheduler, e.g. priority message")
    return parser


def parse_args(argv=None):
    return get_args_parser().parse_args(argv)


def _submitit():
    try:
        import submitit
    except ImportError:
        raise UserError("run_with_submitit.py needs the submitit package: pip install submitit") from None
    return submitit


def get_shared_folder() -> Path:
    """$CONVNEXT_SHARED_DIR, else /checkpoint/$USER/convnext (the official cluster layout)."""
    if os.environ.get("CONVNEXT_SHARED_DIR"):
        folder = Path(os.environ["CONVNEXT_SHARED_DIR"])
    elif Path("/checkpoint/").is_dir():
        folder = Path(f"/checkpoint/{os.getenv('USER')}/convnext")
    else:
        raise UserError("no shared folder: pass --job_dir on a file system all nodes see "
                        "(or set CONVNEXT_SHARED_DIR)")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def get_init_file(job_dir):
    """A fresh file:// rendezvous path (it must not exist; its folder must)."""
    folder = Path(job_dir).parent if "%j" in str(job_dir) else Path(job_dir)
    folder.mkdir(parents=True, exist_ok=True)
    init_file = folder / f"{uuid.uuid4().hex}_init"
    if init_file.exists():
        os.remove(init_file)
    return init_file


class Trainer:
    """The callable submitit runs on every task: one main.py process per GPU."""

    def __init__(self, args):
        self.args = args

    def __call__(self):
        self._setup_gpu_args()
        import main as classification  # in the job: torch and the data load there
        classification.main(self.args)

    def checkpoint(self):
        """On preemption / timeout: requeue with a new rendezvous file and auto-resume."""
        submitit = _submitit()
        self.args.dist_url = get_init_file(self.args.job_dir).as_uri()
        self.args.auto_resume = True
        self.args.resume = ""
        return submitit.helpers.DelayedSubmission(type(self)(self.args))

    def _setup_gpu_args(self):
        job_env = _submitit().JobEnvironment()
        self.args.output_dir = str(self.args.job_dir).replace("%j", str(job_env.job_id))
        self.args.gpu = job_env.local_rank
        self.args.rank = job_env.global_rank
        self.args.world_size = job_env.num_tasks
        print(f"Process group: {job_env.num_tasks} tasks, rank: {job_env.global_rank}", flush=True)


def submit(args):
    submitit = _submitit()
    if not args.job_dir:
        args.job_dir = str(get_shared_folder() / "%j")
    executor = submitit.AutoExecutor(folder=args.job_dir, slurm_max_num_timeout=30)
    kwargs = {}
    constraints = [c for c in (args.constraint, "volta32gb" if args.use_volta32 else "") if c]
    if constraints:
        kwargs["slurm_constraint"] = "&".join(constraints)
    if args.comment:
        kwargs["slurm_comment"] = args.comment
    executor.update_parameters(
        mem_gb=40 * args.ngpus, gpus_per_node=args.ngpus, tasks_per_node=args.ngpus,  # one task per GPU
        cpus_per_task=10, nodes=args.nodes, timeout_min=args.timeout * 60,
        slurm_partition=args.partition, slurm_signal_delay_s=120, name=args.job_name, **kwargs)
    args.dist_url = get_init_file(args.job_dir).as_uri()
    job = executor.submit(Trainer(args))
    print("Submitted job_id:", job.job_id)
    return job


def cli(argv=None):
    return run_cli(lambda a: submit(parse_args(a)), argv)


if __name__ == "__main__":
    sys.exit(cli())

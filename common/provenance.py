"""Where a measurement was made: the machine, the package versions, the commit and the date.

Measured figures in docs/ come from report files the scripts write (`write_report`), each
opening with this record, so a table is never copied or edited by hand. The latency cache keys
its fits by `machine()` too.
"""
import datetime
import importlib.metadata
import os
import platform
import subprocess

from common.files import atomic_open, check_output_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("torch", "timm", "onnxruntime")


def machine():
    """host, CPU model, cores and architecture of this machine."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"host": platform.node(), "cpu": cpu, "cores": os.cpu_count(), "machine": platform.machine()}


def versions(packages=PACKAGES):
    """package -> version of those installed (Python's too)."""
    out = {"python": platform.python_version()}
    for name in packages:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def commit():
    """This checkout's commit (with '+changes' when the tree differs from it), else 'unknown'."""
    def git(*argv):
        return subprocess.run(["git", "-C", ROOT, *argv], capture_output=True, text=True, timeout=10)
    try:
        head = git("rev-parse", "--short=12", "HEAD")
        if head.returncode:
            return "unknown"
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head.stdout.strip() + ("+changes" if dirty else "")


def record():
    """The whole provenance as one JSON-able dict."""
    return {**machine(), **versions(), "commit": commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def write_report(path, script, command, body, overwrite=False):
    """A markdown report: who wrote it (script, command), where it was measured, then `body`.
    Refuses an existing file unless overwrite (common.files.check_output_file)."""
    check_output_file(path, "--report", overwrite)
    r = record()
    head = (f"<!-- written by {script}; rerun it to refresh, do not edit by hand -->\n"
            f"`{command}`\n\n"
            f"Measured on {r['cpu']} ({r['cores']} cores, {r['machine']}); Python {r['python']}, "
            + ", ".join(f"{k} {r[k]}" for k in PACKAGES if k in r)
            + f"; commit {r['commit']}; {r['date']}.\n\n")
    with atomic_open(path) as f:
        f.write(head + body.rstrip() + "\n")

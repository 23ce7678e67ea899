"""Reliability round 3: each class of failure of the attack matrix, met as a user meets it
(real processes, real signals, a real HTTP server, real files)."""
import json
import os
import stat
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import models
from checkpoints.io import save_checkpoint_file
from common.errors import UserError, run_cli
from helpers import ENV, ROOT

DATA = ["--data_set", "DIGITS", "--input_size", "32", "--num_workers", "0", "--device", "cpu"]
RECIPE = ["--batch_size", "64", "--warmup_epochs", "0", "--mixup", "0", "--cutmix", "0", "--reprob", "0",
          "--aa", "none", "--smoothing", "0"]
TRAIN = " ".join(RECIPE[:-2] + ["--opt", "sgd", "--lr", "0.02", "--num_workers", "0", "--device", "cpu"])


def cmd(script, *args):
    return [sys.executable, str(ROOT / script), *map(str, args)]


def run(script, *args, check=False, timeout=600, env=None):
    proc = subprocess.run(cmd(script, *args), cwd=ROOT, env=env or ENV, capture_output=True, text=True,
                          timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def one_line(proc, needle):
    """Exit status 2, one `error:` line holding `needle`, no traceback."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert lines and lines[-1].startswith("error: ") and needle in lines[-1], lines[-3:]


def in_process(capsys, main, *argv, needle):
    """A CLI's main(argv) in this process: exit status 2 and one `error:` line holding `needle`."""
    import logging
    logging.getLogger().handlers.clear()  # an earlier in-process run may have logged to a closed stream
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: ") and needle in err[-1] and "Traceback" not in "\n".join(err), err


def wait_for(test, timeout=120, what="condition"):
    end = time.time() + timeout
    while time.time() < end:
        if test():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


# ----------------------------------------------------------------------------- one run per folder

@pytest.mark.e2e
def test_a_second_run_on_a_folder_in_use_is_refused_and_a_killed_run_leaves_no_lock(tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen(cmd("main.py", "--model", "resnet20", "--epochs", "3", "--output_dir", out,
                                 *DATA, *RECIPE), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        lock = out / ".run.lock"
        wait_for(lambda: lock.exists() and f"pid {first.pid}" in lock.read_text(), what="the lock")
        second = run("main.py", "--model", "resnet20", "--epochs", "3", "--output_dir", out, *DATA, *RECIPE)
        one_line(second, "is in use by another run")
        assert f"pid {first.pid}" in second.stderr
    finally:
        first.kill()
        first.wait()
    from common.files import drop_lock, hold_lock
    hold_lock(str(out), "--output_dir")                                 # the killed run left no lock
    drop_lock(str(out))


@pytest.mark.e2e
def test_a_study_folder_in_use_is_refused(source, tmp_path):
    from common.files import hold_lock
    out = tmp_path / "study"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; "
                               "from common.files import hold_lock; hold_lock(sys.argv[1], 'x'); print('held', flush=True); "
                               "time.sleep(60)", str(out)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        proc = run("pruning/sensitivity.py", "--checkpoint", source, "--output_dir", out, "--sets", "stages.0.*",
                   "--ratios", "0.5")
        one_line(proc, "is in use by another run")
        with pytest.raises(UserError, match="in use"):
            hold_lock(str(out), "--output_dir")
    finally:
        holder.kill()
        holder.wait()


def _children(pid):
    """pids whose parent is `pid` (from /proc)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return out


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.e2e
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux's")
def test_killing_a_study_kills_its_fine_tuning_child(source, tmp_path):
    out = tmp_path / "iter"
    parent = subprocess.Popen(cmd("pruning/iterative.py", "--checkpoint", source, "--output_dir", out,
                                  "--rounds", "1", "--prune", "--criterion l1 --ratio 0.3", "--finetune_epochs", "5",
                                  "--train_args", TRAIN), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    wait_for(lambda: _children(parent.pid), what="the main.py child")
    child = _children(parent.pid)[0]
    parent.send_signal(signal.SIGKILL)   # the parent only, as an OOM killer does
    parent.wait()
    wait_for(lambda: not _alive(child), timeout=30, what="the orphan to die")


# ----------------------------------------------------------------------------- study rows

@pytest.fixture(scope="module")
def study_folder(source, tmp_path_factory):
    out = tmp_path_factory.mktemp("sens") / "sens"
    run("pruning/sensitivity.py", "--checkpoint", source, "--output_dir", out, "--sets", "stages.0.*",
        "--ratios", "0.5", check=True)
    return out


@pytest.mark.parametrize("damage, message", [
    ("duplicate", "repeats the row of line 1"),
    ("seed", "seed is '0', not an integer"),
    ("accuracy", "acc is 1000, not a top-1"),
    ("middle", "line 1 is not JSON"),
    ("missing", "has no 'acc'"),
    ("bytes", "cannot read"),
    ("folder", "cannot read"),
    ("settings", "study.json is not JSON"),
])
def test_crafted_study_folders_are_refused_naming_the_line(source, study_folder, tmp_path, damage, message, capsys):
    from cli.sensitivity import main as sensitivity
    out = tmp_path / "sens"
    shutil.copytree(study_folder, out)
    results = out / "results.jsonl"
    row = json.loads(results.read_text().splitlines()[0])
    text = {"duplicate": [row, row], "seed": [{**row, "seed": "0"}], "accuracy": [{**row, "acc": 1000}],
            "missing": [{k: v for k, v in row.items() if k != "acc"}]}.get(damage)
    if text is not None:
        results.write_text("".join(json.dumps(r) + "\n" for r in text))
    elif damage == "middle":
        results.write_text("{not json\n" + json.dumps(row) + "\n")
    elif damage == "bytes":
        results.write_bytes(b"\xff\xfe\x00garbage\n")
    elif damage == "folder":
        results.unlink()
        results.mkdir()
    else:
        (out / "study.json").write_text("{oops")
    in_process(capsys, sensitivity, "--checkpoint", source, "--output_dir", out, "--sets", "stages.0.*",
               "--ratios", "0.5", needle=message)


def test_an_open_quote_in_pass_through_flags_is_one_line(source, tmp_path, capsys):
    from cli.iterative import main as iterative
    in_process(capsys, iterative, "--checkpoint", source, "--output_dir", tmp_path / "i", "--prune", "--criterion 'l1",
               "--finetune_epochs", "1", needle="--prune")
    in_process(capsys, iterative, "--checkpoint", source, "--output_dir", tmp_path / "i", "--prune", "--ratio 0.2",
               "--finetune_epochs", "1", "--train_args", '--lr "1', needle="--train_args")


# ----------------------------------------------------------------------------- downloads

class _Server:
    """A raw HTTP server on 127.0.0.1: /<mode>/<name> serves `files[name]` well, cut short
    (with or without Content-Length), stalls after the headers, or never answers."""

    def __init__(self, files):
        import socket
        import threading
        self.files, self.sock = files, socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        import threading
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn):
        with conn:
            request = conn.recv(65536).decode()
            mode, name = request.split()[1].strip("/").split("/", 1)
            data = self.files.get(name, b"")
            if mode == "silent":
                time.sleep(30)
                return
            length = f"Content-Length: {len(data)}\r\n" if mode in ("ok", "cut") else ""
            conn.sendall(f"HTTP/1.1 200 OK\r\n{length}Connection: close\r\n\r\n".encode())
            if mode == "stall":
                time.sleep(30)
                return
            conn.sendall(data if mode in ("ok", "plain") else data[: len(data) // 2])

    def close(self):
        self.sock.close()


@pytest.fixture
def server(source, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    other = models.build_model({"family": "convnext", "depths": [1, 1], "dims": [8, 16], "num_classes": 3})
    save_checkpoint_file({"model": other.state_dict(), "arch": other.arch}, tmp_path / "other.pth")
    srv = _Server({"a/best.pth": source.read_bytes(), "b/best.pth": (tmp_path / "other.pth").read_bytes()})
    yield srv
    srv.close()


def _cached_files(tmp_path):
    return [p for p in (tmp_path / "hub").rglob("*") if p.is_file()]


def test_downloads_are_keyed_by_the_whole_url(server):
    from checkpoints.io import load_checkpoint_file
    a = load_checkpoint_file(f"{server.url}/ok/a/best.pth")
    b = load_checkpoint_file(f"{server.url}/ok/b/best.pth")     # same file name, other model
    assert a["arch"]["dims"] == [16, 32] and b["arch"]["dims"] == [8, 16]


@pytest.mark.parametrize("mode, message", [("cut", "cut short"), ("short", "truncated or damaged")])
def test_a_download_cut_short_is_refused_and_never_cached(server, tmp_path, mode, message):
    from checkpoints.io import load_checkpoint_file
    with pytest.raises(UserError, match=message):
        load_checkpoint_file(f"{server.url}/{mode}/a/best.pth")
    assert not _cached_files(tmp_path)
    assert load_checkpoint_file(f"{server.url}/ok/a/best.pth")["arch"]["dims"] == [16, 32]


@pytest.mark.e2e
@pytest.mark.parametrize("mode", ["stall", "silent"])
def test_a_stalled_server_ends_the_command_with_a_message(server, tmp_path, mode):
    start = time.time()
    proc = run("pruning/prune.py", "--checkpoint", f"{server.url}/{mode}/a/best.pth", "--list_groups",
               "--download_timeout", "1", timeout=60, env={**ENV, "TORCH_HOME": str(tmp_path / "torch")})
    one_line(proc, "--download_timeout 1 s")
    assert time.time() - start < 30
    assert not [p for p in (tmp_path / "torch").rglob("*") if p.is_file()]      # no partial file left


# ----------------------------------------------------------------------------- damaged weights

def _flip_tensor_byte(path):
    """Flip one byte inside the first tensor's data of a torch.save zip."""
    import zipfile
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if "/data/" in i.filename and i.file_size > 64)
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
        at = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
        f.seek(at)
        byte = f.read(1)[0]
        f.seek(at)
        f.write(bytes([byte ^ 0xFF]))


@pytest.mark.e2e
def test_a_flipped_byte_in_a_checkpoint_is_refused(source, tmp_path, capsys):
    from cli.prune import main as prune
    bad = tmp_path / "flipped.pth"
    shutil.copy(source, bad)
    _flip_tensor_byte(bad)
    one_line(run("main.py", "--eval", "true", "--resume", bad, *DATA), "CRC")
    in_process(capsys, prune, "--checkpoint", bad, "--list_groups", needle="CRC")


@pytest.mark.e2e
def test_integer_weights_are_refused_by_name(source, tmp_path, capsys):
    from checkpoints.io import load_checkpoint_file
    from cli.prune import main as prune
    ckpt = load_checkpoint_file(source)
    ckpt["model"]["head.weight"] = ckpt["model"]["head.weight"].long()
    save_checkpoint_file(ckpt, tmp_path / "int.pth")
    message = "head.weight holds int64 values, not floating point"
    one_line(run("main.py", "--eval", "true", "--resume", tmp_path / "int.pth", *DATA), message)
    in_process(capsys, prune, "--checkpoint", tmp_path / "int.pth", "--ratio", "0.5", "--dry_run", needle=message)


@pytest.mark.e2e
def test_a_nan_best_accuracy_is_refused_on_resume(tmp_path):
    import argparse
    from checkpoints.training_state import training_checkpoint
    from utils import NativeScalerWithGradNormCount as NativeScaler
    model = models.create_model("resnet20")
    optimizer = torch.optim.AdamW(model.parameters())
    args = argparse.Namespace(model="resnet20", input_size=32, data_set="DIGITS")
    ckpt = training_checkpoint(args, model, optimizer, NativeScaler(enabled=False, device="cpu"), epoch=0,
                               max_accuracy=float("nan"))
    save_checkpoint_file(ckpt, tmp_path / "c.pth")
    one_line(run("main.py", "--model", "resnet20", "--epochs", "2", "--resume", tmp_path / "c.pth", *DATA, *RECIPE),
             "max_accuracy is nan, not a top-1")


@pytest.mark.cli
def test_a_damaged_or_stripped_onnx_file_is_refused(source, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    from cli.export import main as export_main
    from cli.inference import main as inference_main
    import onnx
    from PIL import Image
    model = tmp_path / "m.onnx"
    assert run_cli(export_main, ["--checkpoint", str(source), "--output", str(model)]) == 0
    image = tmp_path / "x.png"
    Image.new("RGB", (8, 8), (40, 90, 200)).save(image)
    assert inference_main(["--image", str(image), "--checkpoint", str(model)]) == 0
    assert inference_main(["--image", str(image), "--checkpoint", str(model), "--input_size", "64"]) == 2
    assert "was exported for 32 px" in capsys.readouterr().err
    stripped = onnx.load(model)
    del stripped.metadata_props[:]
    onnx.save(stripped, tmp_path / "stripped.onnx")
    assert inference_main(["--image", str(image), "--checkpoint", str(tmp_path / "stripped.onnx")]) == 2
    assert "no export metadata" in capsys.readouterr().err
    data = bytearray(model.read_bytes())
    weights = bytes(onnx.numpy_helper.to_array(max(onnx.load(model).graph.initializer,
                                                   key=lambda t: len(t.raw_data))).tobytes())
    at = bytes(data).find(weights[:64]) + 32
    data[at] ^= 0xFF
    (tmp_path / "flipped.onnx").write_bytes(bytes(data))
    assert inference_main(["--image", str(image), "--checkpoint", str(tmp_path / "flipped.onnx")]) == 2
    assert "is damaged" in capsys.readouterr().err


# ----------------------------------------------------------------------------- distributed runs

@pytest.mark.e2e
def test_dist_eval_of_a_batchnorm_model_reports_what_the_checkpoint_holds(tmp_path):
    out = tmp_path / "dist"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(ROOT / "main.py"), "--model", "resnet20", "--epochs", "1", "--output_dir", str(out),
                           "--dist_eval", "true", *DATA, *RECIPE], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reported = json.loads((out / "log.txt").read_text().splitlines()[-1])["test_acc1"]
    again = run("main.py", "--eval", "true", "--resume", out / "checkpoint-0.pth", *DATA, check=True)
    assert f"Accuracy of the network on the 360 test images: {reported:.5f}%" in again.stdout + again.stderr


@pytest.mark.e2e
def test_ranks_launched_with_different_flags_stop_together_with_a_message(tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen(cmd("main.py", "--model", "resnet20", "--epochs", "1", "--lr", lr, *DATA, *RECIPE),
                              cwd=ROOT, env={**ENV, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
                                             "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for rank, lr in ((0, "0.01"), (1, "0.02"))]
    for p in procs:
        err = p.communicate(timeout=120)[1]
        assert p.returncode == 2 and "launched with different flags (--lr" in err.strip().splitlines()[-1], err[-2000:]


# ----------------------------------------------------------------------------- outputs, signals, bounds

@pytest.fixture
def unwritable(tmp_path):
    """A folder this process cannot create files in (sysfs when running as root)."""
    if os.geteuid() == 0:
        folder = Path("/sys")
    else:
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o555)
    with pytest.raises(OSError):
        (folder / "probe").write_text("x")
    return folder


def test_unwritable_outputs_are_one_line_before_any_work(source, unwritable, tmp_path, capsys):
    import main
    from cli.prune import main as prune
    from cli.sensitivity import main as sensitivity
    from cli.benchmark import cli as benchmark
    in_process(capsys, prune, "--checkpoint", source, "--output", unwritable / "p.pth", "--ratio", "0.5",
               needle="not writable")
    in_process(capsys, main.cli, "--model", "resnet20", "--epochs", "1", "--output_dir", unwritable / "run", *DATA,
               needle="cannot create or write in it")
    in_process(capsys, sensitivity, "--checkpoint", source, "--output_dir", unwritable / "s", "--sets", "stages.0.*",
               "--ratios", "0.5", needle="cannot create or write in it")
    in_process(capsys, benchmark, "--models", "resnet20", "--input_size", "32", "--json", unwritable / "b.json",
               needle="not writable")
    in_process(capsys, prune, "--checkpoint", source, "--output", "", "--ratio", "0.5", needle="it is empty")
    in_process(capsys, prune, "--checkpoint", source, "--output", tmp_path / ("x" * 300 + ".pth"), "--ratio", "0.5",
               needle="too long")


@pytest.mark.e2e
def test_writing_through_a_link_never_touches_its_target(tmp_path):
    foreign = tmp_path / "foreign.txt"
    foreign.write_text("not yours")
    link = tmp_path / "out.json"
    link.symlink_to(foreign)
    run("scripts/benchmark.py", "--models", "resnet20", "--input_size", "32", "--batch_size", "2", "--iters", "2",
        "--warmup", "1", "--skip", "train,latency", "--json", link, "--overwrite", check=True)
    assert foreign.read_text() == "not yours" and not link.is_symlink() and link.read_text().startswith("{")


@pytest.mark.e2e
def test_sigterm_says_what_is_saved_and_where_the_run_resumes(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(cmd("main.py", "--model", "resnet20", "--epochs", "50", "--output_dir", out,
                                *DATA, *RECIPE), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    wait_for(lambda: (out / "checkpoint-0.pth").exists() or proc.poll() is not None, what="epoch 0")
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1].strip().splitlines()
    assert proc.returncode == 143, err[-5:]
    assert err[-1].startswith("terminated (SIGTERM): stopped;") and "resumes at epoch" in err[-1], err[-3:]


def _png_claiming(path, width, height):
    """A tiny PNG whose header claims width x height pixels (a decompression bomb's header)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


@pytest.mark.e2e
def test_a_decompression_bomb_is_one_line_naming_the_file(tmp_path, capsys):
    bomb = tmp_path / "bomb.png"
    _png_claiming(bomb, 30000, 30000)
    ckpt = tmp_path / "r.pth"
    model = models.create_model("resnet20", num_classes=2)
    save_checkpoint_file({"model": model.state_dict(), "arch": model.arch, "args": {"input_size": 32}}, ckpt)
    from cli.inference import main as inference
    in_process(capsys, inference, "--image", bomb, "--checkpoint", ckpt, needle="bomb.png has more than")
    from PIL import Image
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    (tmp_path / "names.txt").write_bytes(b"\xff\xfeclass a\nclass b\n")
    in_process(capsys, inference, "--image", tmp_path / "ok.png", "--checkpoint", ckpt, "--class_names",
               tmp_path / "names.txt", needle="is not UTF-8 text")
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (tmp_path / "data" / split / cls).mkdir(parents=True)
            shutil.copy(bomb, tmp_path / "data" / split / cls / "x.png")
    one_line(run("main.py", "--eval", "true", "--resume", ckpt, "--data_set", "image_folder", "--data_path",
                 tmp_path / "data" / "train", "--eval_data_path", tmp_path / "data" / "val", "--input_size", "32",
                 "--nb_classes", "2", "--device", "cpu", "--num_workers", "1"), "x.png has more than")


def test_flags_that_cannot_work_are_refused_before_any_data(source, tmp_path, capsys):
    import main
    from PIL import Image
    from cli.benchmark import cli as benchmark
    from cli.inference import main as inference
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    in_process(capsys, inference, "--image", tmp_path / "ok.png", "--checkpoint", source, "--input_size", "100000",
               needle="for activations alone")
    in_process(capsys, main.cli, "--model", "resnet20", "--aa", "bogus", "--epochs", "1", *DATA, needle="--aa 'bogus'")
    in_process(capsys, main.cli, "--model", "resnet20", "--epochs", "1", "--data_set", "DIGITS", "--device", "cpu",
               "--input_size", "100000", needle="for activations alone")
    in_process(capsys, benchmark, "--models", "resnet20", "--min_time", "inf", needle="--min_time")


@pytest.mark.cli
@pytest.mark.parametrize("ref", ["hf-hub:org/small@../../../../victim.txt", "hf-hub:org/small@main/../../x",
                                 "hf-hub:org..x/small", "hf-hub:org--x/small", "hf-hub:-org/small",
                                 "hf-hub:org./small", "hf-hub:org/" + "s" * 96])
def test_a_hub_id_that_could_name_a_path_outside_the_cache_is_one_line(ref, tmp_path, monkeypatch, capsys):
    """A revision of '..' parts would walk out of the Hub cache and overwrite a file there; ids the
    Hub cannot hold would end in its validation traceback. Both are refused before any path is
    built, and the file outside the cache is untouched."""
    from cli.prune import main as prune_main
    cache = tmp_path / "a" / "b" / "c" / "hf"
    monkeypatch.setenv("HF_HOME", str(cache))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: no request may be needed
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    assert prune_main(["--checkpoint", ref, "--output", str(tmp_path / "o.pth"), "--ratio", "0.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {ref}: ")
    assert victim.read_text() == "keep me" and not cache.exists()


@pytest.mark.cli
def test_a_pipe_or_device_as_output_is_refused_even_with_overwrite(source, tmp_path, capsys):
    """--overwrite replaces a file this run may replace; a FIFO or a device is never turned into one."""
    from cli.prune import main as prune_main
    fifo = tmp_path / "out.pth"
    os.mkfifo(fifo)
    for target in (fifo, "/dev/null"):
        assert prune_main(["--checkpoint", str(source), "--output", str(target), "--ratio", "0.5", "--overwrite"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "is not a regular file" in err[0]
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and stat.S_ISCHR(os.stat("/dev/null").st_mode)


@pytest.mark.cli
def test_a_non_finite_model_ema_is_refused_not_carried_into_the_pruned_file(tmp_path, capsys):
    import models
    from cli.prune import main as prune_main
    torch.manual_seed(0)
    model = models.build_model({"family": "convnext", "depths": [1, 1, 1, 1], "dims": [8, 16, 24, 32], "num_classes": 10})
    ema = {k: v.clone() for k, v in model.state_dict().items()}
    ema["stages.1.0.norm.weight"][3] = float("nan")
    path = tmp_path / "src.pth"
    save_checkpoint_file({"model": model.state_dict(), "model_ema": ema, "arch": model.arch,
                          "args": {"input_size": 32, "data_set": "DIGITS"}}, path)
    out = tmp_path / "out.pth"
    assert prune_main(["--checkpoint", str(path), "--output", str(out), "--ratio", "0.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model_ema weights hold NaN" in err[0] and "stages.1.0.norm.weight" in err[0]
    assert not out.exists()

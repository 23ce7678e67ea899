"""Reliability round 4: each class met as a user meets it (a raw server on 127.0.0.1, links,
hard-linked copies, concurrent prunes, damaged caches, odd criteria and calibration data,
pass-through flags)."""
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

import pruning
from checkpoints import sources
from common.errors import UserError
from common.files import drop_lock, hold_lock
from conftest import randomised
from helpers import ROOT
from pruning import Calibration, Criterion, KeepRules, PruneSpec


def raw_server(answer):
    """A one-thread server on 127.0.0.1 that reads a request and runs answer(conn) per connection."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)

    def serve():
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                conn.recv(65536)
                try:
                    answer(conn)
                except OSError:
                    pass
    threading.Thread(target=serve, daemon=True).start()
    return srv, f"http://127.0.0.1:{srv.getsockname()[1]}"


def drip(conn):
    conn.sendall(b"HTTP/1.1 200 OK\r\n\r\n")
    for _ in range(200):
        conn.sendall(b"x")
        time.sleep(0.05)


ANSWERS = {
    "cut chunked body": (lambda c: c.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n01234"),
                         "cut the transfer short"),
    "bad status line": (lambda c: c.sendall(b"HELLO\r\n\r\n"), "not valid HTTP"),
    "70 kB header": (lambda c: c.sendall(b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70000 + b"\r\n\r\n"), "not valid HTTP"),
    "drip": (drip, "stalled"),
}


@pytest.mark.parametrize("case", sorted(ANSWERS))
def test_broken_servers_end_in_one_line_and_cache_nothing(case, tmp_path, monkeypatch):
    answer, words = ANSWERS[case]
    srv, base = raw_server(answer)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    monkeypatch.setattr(sources, "DOWNLOAD_TIMEOUT", 1.0)
    try:
        start = time.monotonic()
        with pytest.raises(UserError, match=words):
            sources.download(f"{base}/w.pth")
        assert time.monotonic() - start < 8  # the drip is stopped by the rate, not by the server
    finally:
        srv.close()
    cached = [f for _, _, files in os.walk(tmp_path / "hub") for f in files]
    assert cached == []


def test_a_legacy_pickle_cut_short_without_content_length_is_not_cached(tmp_path, monkeypatch):
    torch.save({"model": {"w": torch.randn(256, 256)}}, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    body = (tmp_path / "legacy.pth").read_bytes()[:-4096]
    srv, base = raw_server(lambda c: c.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + body))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    try:
        with pytest.raises(UserError, match="legacy.pth"):
            sources.download(f"{base}/legacy.pth")
    finally:
        srv.close()
    assert [f for _, _, files in os.walk(tmp_path / "hub") for f in files] == []


@pytest.mark.parametrize("url,words", [("http://127.0.0.1:abc/w.pth", "malformed URL"),
                                       ("http://[::1/w.pth", "malformed URL"), ("http:///w.pth", "no host"),
                                       ("http://127.0.0.1/a/..", "not a plain file name")])
def test_malformed_urls_are_refused_before_any_path_is_built(url, words):
    with pytest.raises(UserError, match=words):
        sources.check_source(url, "--checkpoint")


def test_a_linked_lock_is_never_written_through_and_a_copied_lock_does_not_block(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    linked = tmp_path / "linked"
    linked.mkdir()
    os.symlink(victim, linked / ".run.lock")
    with pytest.raises(UserError, match="symbolic link"):
        hold_lock(str(linked), "--output_dir")
    assert victim.read_text() == "keep me"
    held = tmp_path / "held"
    hold_lock(str(held), "--output_dir")
    try:
        subprocess.run(["cp", "-al", str(held), str(tmp_path / "copy")], check=True)
        out = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
                              "from common.files import hold_lock; hold_lock(sys.argv[2], 'x'); print('held')",
                              ROOT, str(tmp_path / "copy")], capture_output=True, text=True, cwd=ROOT)
        assert out.stdout.strip() == "held", out.stderr
        assert "pid" in (held / ".run.lock").read_text()  # the original's lock untouched
    finally:
        drop_lock(str(held))


def test_a_study_plot_replaces_a_link_and_leaves_its_target(tmp_path):
    from studies import study
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    os.symlink(victim, tmp_path / "accuracy.png")
    plt = study.pyplot()
    fig, ax = plt.subplots()
    ax.plot([1, 2], [3, 4], label="x")
    study.finish_plot(plt, fig, ax, 3.5, "params", str(tmp_path / "accuracy.png"))
    assert victim.read_text() == "keep me" and not os.path.islink(tmp_path / "accuracy.png")


@pytest.mark.e2e
def test_two_prunes_to_one_output_cannot_both_claim_it(tmp_path):
    from checkpoints.io import save_checkpoint_file
    import models
    model = models.create_model("convnext_tiny", num_classes=10)
    save_checkpoint_file({"model": model.state_dict(), "arch": model.arch}, tmp_path / "src.pth")
    hold_lock(str(tmp_path), "--output", ".out.pth.lock", thing="out.pth")  # a prune writing it now
    try:
        out = subprocess.run([sys.executable, "pruning/prune.py", "--checkpoint", str(tmp_path / "src.pth"),
                              "--ratio", "0.5", "--output", str(tmp_path / "out.pth")], cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
    finally:
        drop_lock(str(tmp_path), ".out.pth.lock")
    assert out.returncode == 2 and "is in use by another run" in out.stderr
    assert not (tmp_path / "out.pth").exists()


@pytest.mark.parametrize("name,score,words", [
    ("odd_negative", lambda w: -w.abs().flatten(1).sum(1), "negative"),
    ("odd_nan", lambda w: w.flatten(1).sum(1) * float("nan"), "NaN"), ("odd_none", lambda w: None, "NoneType"),
    ("odd_scalar", lambda w: torch.tensor(1.0), "shape"), ("odd_short", lambda w: w.flatten(1).sum(1)[:-1].abs(), "shape"),
    ("odd_raises", lambda w: 1 / 0, "ZeroDivisionError")])
def test_a_registered_criterion_that_misbehaves_is_one_line(name, score, words):
    import models
    model = randomised(models.FAMILIES["convnext_isotropic"].example_arch())
    pruning.register_criterion(Criterion(name=name, summary="misbehaves", score=score), replace_existing=True)
    try:
        with pytest.raises(UserError, match=words):
            pruning.prune(model, PruneSpec(criterion=name, rules=KeepRules(ratio=0.5), input_size=32))
    finally:
        pruning.CRITERIA.pop(name)  # other tests list the registry


@pytest.mark.parametrize("batch,words", [((torch.randn(2, 1, 32, 32), torch.tensor([0, 1])), r"float \[N, 3, H, W\]"),
                                         ((torch.randn(2, 3, 32, 32), torch.tensor([0, 15])), r"in \[0, 3\)"),
                                         ((torch.randn(2, 3, 32, 32), torch.tensor([0.5, 1.0])), "integers"),
                                         ((torch.randn(2, 3, 32, 32), "cats"), "pairs of tensors")])
def test_calibration_batches_given_in_python_are_checked(batch, words):
    import models
    model = randomised(models.FAMILIES["convnext_isotropic"].example_arch())
    with pytest.raises(UserError, match=words):
        pruning.prune(model, PruneSpec(criterion="taylor", rules=KeepRules(ratio=0.5), input_size=32,
                                       calibration=Calibration(data=[batch])))


def test_latency_cache_of_the_wrong_shape_is_refused_with_its_path(tmp_path):
    from pruning.latency import read_cache
    for data in ([], None, {"rates": "1", "fit_errors": {}}, {"rates": [1, 2], "fit_errors": {}},
                 {"rates": [[1], [2], [3], [4]], "fit_errors": {}}, {"rates": [1, 2, float("nan"), 4], "fit_errors": {}},
                 {"rates": [1, 2, -3, 4], "fit_errors": {}}):
        path = tmp_path / "cache.json"
        path.write_text(json.dumps(data))
        with pytest.raises(UserError, match=f"latency cache {path}"):
            read_cache(str(path))
    with pytest.raises(UserError, match=r"target_speedup must be in \(1, 1000\]"):
        KeepRules(target_speedup=1e308)


def test_pass_through_flags_the_study_sets_are_refused_in_any_spelling():
    from cli.options import main_flags
    from studies import study
    for text, words in (("--lr 1e-3 --seed=7", "--seed is set by this tool"),
                        ("--epoch 2", "abbreviates --epochs"), ("--output_dir=x", "set by this tool")):
        with pytest.raises(UserError, match=words):
            study.check_train_args(text, main_flags())
    study.check_train_args("--lr 1e-3 --warmup_epochs 0", main_flags())


def test_timm_weights_built_with_another_norm_eps_are_not_read_as_ours():
    import timm
    from checkpoints.identity import read_held
    timm_own = timm.models.convnext.convnext_atto(num_classes=3)  # timm's class, timm's key layout
    args = {"model": "convnext_tiny", "model_kwargs": {"norm_eps": 1e-5}}
    with pytest.raises(UserError, match="norm_eps=1e-05"):
        read_held({"model": timm_own.state_dict(), "args": args})
    held = read_held({"model": timm_own.state_dict(), "args": {"model": "convnext_tiny"}})  # the default eps
    assert "downsample_layers.0.0.weight" in held.state


@pytest.mark.e2e
def test_a_hub_endpoint_that_never_answers_ends_the_run(tmp_path):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    held = []
    threading.Thread(target=lambda: [held.append(srv.accept()) for _ in iter(int, 1)], daemon=True).start()
    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{srv.getsockname()[1]}", "HF_HOME": str(tmp_path / "hf")}
    start = time.monotonic()
    out = subprocess.run([sys.executable, "pruning/prune.py", "--checkpoint", "hf-hub:org/name", "--ratio", "0.5",
                          "--dry_run", "--download_timeout", "1"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=240)
    srv.close()
    assert out.returncode == 2 and "the Hub endpoint does not answer" in out.stderr
    assert time.monotonic() - start < 120


def test_a_latency_batch_beyond_memory_is_refused_before_any_timing():
    import models
    model = randomised(models.FAMILIES["convnext_isotropic"].example_arch())
    with pytest.raises(UserError, match="batch of 10000000 needs at least"):
        pruning.prune(model, PruneSpec(rules=KeepRules(target_speedup=2, latency_batch=10 ** 7), input_size=32))

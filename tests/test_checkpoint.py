"""checkpoint.py: safe loading (files and URLs), clear refusals, atomic saving, the weights inside."""
import argparse
import functools
import http.server
import io
import os
import pathlib
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from timm.utils import ModelEmaV3

from checkpoints.identity import load_model_state, model_state, saved_args
from checkpoints.io import load_checkpoint_file, save_checkpoint_file
from checkpoints.training_state import restore_training, training_checkpoint
import models
import utils
from common.errors import UserError

TINY_ARCH = {"family": "convnext", "depths": [1, 1, 1, 1], "dims": [8, 16, 24, 32], "hidden": None,
             "dw": "standard", "dw_branches": None, "num_classes": 10, "in_chans": 3}


def tiny_model(**overrides):
    return models.build_model({**TINY_ARCH, **overrides})


# ----------------------------------------------------------------------------- reading files

def test_missing_and_truncated_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_checkpoint_file(tmp_path / "none.pth")
    good = tmp_path / "good.pth"
    save_checkpoint_file({"model": tiny_model().state_dict()}, good)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(UserError, match="truncated"):
        load_checkpoint_file(cut)
    with pytest.raises(UserError, match="is a folder"):
        load_checkpoint_file(tmp_path)


@pytest.mark.parametrize("content, message", [
    (b"", r"is empty \(0 bytes\)"),
    (bytes(np.random.default_rng(0).integers(1, 127, 4096, dtype=np.uint8)), "not a PyTorch checkpoint"),
    (b'{"train_lr": 0.004, "epoch": 0}\n', "not a PyTorch checkpoint"),
])
def test_files_that_are_not_checkpoints(tmp_path, content, message):
    path = tmp_path / "x.pth"
    path.write_bytes(content)
    with pytest.raises(UserError, match=message) as err:
        load_checkpoint_file(path)
    assert "allow-list" not in str(err.value)   # not mistaken for a security refusal


def test_legacy_tar_checkpoint_gets_a_whole_sentence(tmp_path):
    path = tmp_path / "old.pth.tar"
    with tarfile.open(path, "w") as tar:
        data = b"pickle bytes of an old torch.save"
        info = tarfile.TarInfo("storages")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(UserError) as err:
        load_checkpoint_file(path)
    assert "legacy tar format" in str(err.value) and str(err.value).endswith("save it again")


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_unsafe_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"model": {}, "x": _RunsCode(marker)}, evil)
    with pytest.raises(UserError, match="refusing"):
        load_checkpoint_file(evil)
    assert not marker.exists()


def test_official_format_loads_with_namespace_numpy_and_posix_paths(tmp_path):
    path = tmp_path / "official.pth"
    ns = argparse.Namespace(model="convnext_tiny", lr=np.float64(4e-3), input_size=224,
                            output_dir=pathlib.PosixPath("/checkpoint/me/convnext"))
    torch.save({"model": tiny_model().state_dict(), "epoch": "best", "args": ns}, path)
    ckpt = load_checkpoint_file(path)
    assert isinstance(ckpt["args"], argparse.Namespace) and ckpt["epoch"] == "best"
    assert ckpt["args"].output_dir == pathlib.PosixPath("/checkpoint/me/convnext")
    assert saved_args(ckpt)["output_dir"] == "/checkpoint/me/convnext"


# ----------------------------------------------------------------------------- URLs

@pytest.fixture
def http_server(tmp_path):
    """A real HTTP server on 127.0.0.1 serving tmp_path/www; yields (base URL, folder)."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", root
    server.shutdown()
    server.server_close()


def test_url_is_downloaded_to_the_hub_cache_and_loaded_safely(http_server, tmp_path, monkeypatch):
    base, root = http_server
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    sd = tiny_model().state_dict()
    save_checkpoint_file({"model": sd}, root / "tiny.pth")
    ckpt = load_checkpoint_file(f"{base}/tiny.pth")
    assert torch.equal(ckpt["model"]["head.weight"], sd["head.weight"])
    cached = list((tmp_path / "hub" / "checkpoints").glob("*/tiny.pth"))  # a folder per URL
    assert len(cached) == 1 and cached[0].is_file()
    (root / "tiny.pth").unlink()                       # a second use reads the cache
    assert set(load_checkpoint_file(f"{base}/tiny.pth")["model"]) == set(sd)


def test_url_hash_prefix_is_checked_and_nothing_partial_is_left(http_server, tmp_path, monkeypatch):
    base, root = http_server
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    save_checkpoint_file({"model": tiny_model().state_dict()}, root / "tiny-deadbeef.pth")
    with pytest.raises(UserError, match="corrupt"):
        load_checkpoint_file(f"{base}/tiny-deadbeef.pth")
    assert not [p for p in (tmp_path / "hub" / "checkpoints").rglob("*") if p.is_file()]
    with pytest.raises(UserError, match="HTTP 404"):
        load_checkpoint_file(f"{base}/missing.pth")
    with pytest.raises(UserError, match="only local paths, http"):
        load_checkpoint_file("s3://bucket/x.pth")


def test_url_malicious_file_is_refused(http_server, tmp_path, monkeypatch):
    base, root = http_server
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    marker = tmp_path / "pwned"
    torch.save({"x": _RunsCode(marker)}, root / "evil.pth")
    with pytest.raises(UserError, match="refusing"):
        load_checkpoint_file(f"{base}/evil.pth")
    assert not marker.exists()


# ----------------------------------------------------------------------------- writing

def test_save_is_atomic_and_leaves_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "c.pth"
    save_checkpoint_file({"a": torch.ones(2)}, path)

    def broken(obj, f):
        f.write(b"half")
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint_file({"a": torch.zeros(2)}, path)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint_file(path)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["c.pth"]


# ----------------------------------------------------------------------------- weights

def test_model_state_key_and_prefix():
    sd = tiny_model().state_dict()
    ckpt = {"model_ema": {f"backbone.{k}": v for k, v in sd.items()}, "epoch": 1}
    got = model_state(ckpt, "model|model_ema", "backbone.")
    assert set(got) == set(sd)
    assert set(model_state(sd)) == set(sd)          # a bare state dict
    with pytest.raises(UserError, match="no weights"):
        model_state({"epoch": 3})


def test_non_finite_weights_are_refused():
    sd = tiny_model().state_dict()
    sd["stages.1.0.pwconv1.weight"][0, 0] = float("nan")
    with pytest.raises(UserError, match=r"NaN or infinite values \(1 tensors, e.g. stages.1.0.pwconv1.weight\)"):
        model_state({"model": sd})


def test_finetune_drops_a_head_of_another_class_count():
    src = tiny_model(num_classes=100).state_dict()
    model = tiny_model(num_classes=10)
    head = model.head.weight.clone()
    load_model_state(model, src, "--finetune x.pth", drop_head_on_mismatch=True)
    assert torch.equal(model.head.weight, head)   # fresh head kept
    assert torch.equal(model.stages[0][0].pwconv1.weight, src["stages.0.0.pwconv1.weight"])
    with pytest.raises(UserError, match=r"head.weight is \[100, 32\] in the checkpoint"):
        load_model_state(tiny_model(num_classes=10), src, "--resume x.pth")


def test_other_shape_mismatch_names_tensors_and_checkpoint_shape():
    src = tiny_model(dims=[8, 16, 24, 16]).state_dict()
    with pytest.raises(UserError) as err:
        load_model_state(tiny_model(), src, "--finetune pruned.pth", drop_head_on_mismatch=True)
    msg = str(err.value)
    assert "stages.3.0" in msg or "downsample_layers.3" in msg
    assert "in the checkpoint" in msg and "dims [8, 16, 24, 16]" in msg
    partial = {k: v for k, v in tiny_model().state_dict().items() if not k.startswith("stages.1")}
    with pytest.raises(UserError, match="missing tensors: stages.1"):
        load_model_state(tiny_model(), partial, "--finetune part.pth", drop_head_on_mismatch=True)


def test_finetune_refuses_unused_tensors_and_drops_any_timm_head():
    import timm
    src = tiny_model().state_dict()
    no_scale = tiny_model(layer_scale=False)
    with pytest.raises(UserError, match="unexpected tensors: .*gamma"):
        load_model_state(no_scale, src, "--finetune x.pth", drop_head_on_mismatch=True)
    resnet = timm.create_model("resnet18", num_classes=3)
    load_model_state(resnet, timm.create_model("resnet18", num_classes=7).state_dict(),
                                "--finetune r.pth", drop_head_on_mismatch=True)
    assert resnet.fc.out_features == 3


# ----------------------------------------------------------------------------- training state

def test_training_checkpoint_round_trip_restores_everything(tmp_path):
    torch.manual_seed(0)
    model = tiny_model()
    ema = ModelEmaV3(model, decay=0.5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    ema.update(model)
    scaler = utils.NativeScalerWithGradNormCount(enabled=False, device="cpu")
    args = argparse.Namespace(job_dir=Path("/x/y"), start_epoch=0)
    ckpt = training_checkpoint(args, model, opt, scaler, ema, 4, max_accuracy=55.5,
                                          max_accuracy_ema=44.0)
    save_checkpoint_file(ckpt, tmp_path / "checkpoint-4.pth")
    ckpt = load_checkpoint_file(tmp_path / "checkpoint-4.pth")
    assert ckpt["arch"] == model.arch and ckpt["args"]["job_dir"] == "/x/y"

    fresh = tiny_model()
    fresh.load_state_dict(ckpt["model"])
    fresh_ema = ModelEmaV3(fresh, decay=0.5)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    restored = restore_training(ckpt, "x", fresh_ema, fresh_opt, scaler)
    assert restored == {"max_accuracy": 55.5, "max_accuracy_ema": 44.0}
    assert args.start_epoch == 0  # the epoch to start at is main.py's to resolve, not written here
    for a, b in zip(ema.module.state_dict().values(), fresh_ema.module.state_dict().values()):
        assert torch.equal(a, b)
    assert fresh_opt.state_dict()["state"][0]["step"] == 1


def test_resume_training_from_best_is_refused():
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters())
    scaler = utils.NativeScalerWithGradNormCount(enabled=False, device="cpu")
    ckpt = training_checkpoint(argparse.Namespace(), model, opt, scaler, epoch="best")
    with pytest.raises(UserError, match="--finetune"):
        restore_training(ckpt, "best.pth", None, opt, scaler)
    restore_training(ckpt, "best.pth")   # evaluation is fine


@pytest.mark.cli
def test_timm_train_and_lightning_checkpoints_are_read(tmp_path, capsys):
    """timm's train.py saves {'state_dict': ..., 'arch': NAME}; Lightning {'state_dict':
    {'model.<key>': ...}}: both prune as the weights they hold."""
    from cli.prune import main as prune_main
    torch.manual_seed(0)
    model = models.build_model({"family": "convnext", "depths": [1, 1, 1, 1], "dims": [8, 16, 24, 32],
                                "num_classes": 10})
    sd = model.state_dict()
    for name, ckpt in (("timm", {"state_dict": sd, "arch": "convnext_tiny", "epoch": 3}),
                       ("lightning", {"state_dict": {f"model.{k}": v for k, v in sd.items()}, "epoch": 3})):
        path = tmp_path / f"{name}.pth"
        torch.save(ckpt, path)
        assert prune_main(["--checkpoint", str(path), "--dry_run", "--ratio", "0.5", "--input_size", "32"]) == 0, \
            capsys.readouterr().err
        assert "ConvNeXt depths [1, 1, 1, 1] dims [8, 16, 24, 32]" in capsys.readouterr().out

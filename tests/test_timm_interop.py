"""Weights from timm and the Hub, and models plain timm loads: timm's ConvNeXt key layout,
.safetensors files, hf-hub: ids (a real HTTP endpoint on 127.0.0.1), timm's pretrained names,
the timm export folder (loaded in a Python that imports only timm), weights-only outputs."""
import hashlib
import http.server
import json
import subprocess
import sys
import threading

import pytest
import timm
import timm.models.convnext as timm_convnext
import torch
from safetensors.torch import load_file, save_file

from checkpoints.identity import load_held_model, read_held
from checkpoints.io import load_checkpoint_file, save_checkpoint_file, save_weights_file
from checkpoints import timm_folder as hub
import models
from common.errors import UserError, run_cli
from cli.prune import main as prune_main

from cli.export import main as export_main
from helpers import ENV, ROOT

SMALL = {"depths": (1, 1, 3, 1), "dims": (16, 32, 48, 64)}


def timm_model(classes=10, seed=0, **kwargs):
    """timm's own ConvNeXt with perturbed weights (not the init: every tensor matters)."""
    torch.manual_seed(seed)
    model = timm_convnext.ConvNeXt(**{**SMALL, **kwargs}, num_classes=classes)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def logits(model, size=32, seed=1, in_chans=3):
    torch.manual_seed(seed)
    with torch.no_grad():
        return model.eval()(torch.randn(4, in_chans, size, size))


def one_line_error(capsys, main, *argv):
    """Run a CLI in-process: its message must be one `error:` line, exit status 2."""
    assert run_cli(main, [str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def run(script, *args, env=None, check=True):
    proc = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT,
                          env=env or ENV, capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def timm_files(tmp_path_factory):
    """(timm model, its state dict saved with torch.save, the same as .safetensors)."""
    folder = tmp_path_factory.mktemp("timm_files")
    model = timm_model()
    torch.save(model.state_dict(), folder / "timm.pth")
    save_file(model.state_dict(), folder / "model.safetensors")
    return model, folder / "timm.pth", folder / "model.safetensors"


# ----------------------------------------------------------------------------- reading timm's layout

@pytest.mark.parametrize("kind", ["pth", "safetensors"])
def test_timm_layout_reads_as_ours_with_timms_logits(timm_files, kind):
    model, pth, st = timm_files
    ours, held = load_held_model(pth if kind == "pth" else st)
    assert isinstance(ours, models.FAMILIES["convnext"])
    assert held.arch["dims"] == list(SMALL["dims"]) and held.num_classes == 10
    assert torch.allclose(logits(ours), logits(model), atol=1e-5)


@pytest.mark.parametrize("variant, why", [
    (dict(stem_type="overlap"), "overlapping stem"), (dict(use_grn=True), "GRN"),
    (dict(head_norm_first=True), "norm-first"), (dict(kernel_sizes=5), "not 7x7"),
    (dict(norm_layer="rmsnorm2d"), "RMSNorm"), (dict(head_hidden_size=24), "MLP head"),
])
def test_timm_variants_we_cannot_rebuild_get_one_line(variant, why, tmp_path, capsys):
    path = tmp_path / "v.safetensors"
    save_file(timm_model(**variant).state_dict(), path)
    assert why in one_line_error(capsys, prune_main, "--checkpoint", path, "--list_groups")


def test_timms_test_convnext_is_not_taken_for_ours(tmp_path, capsys):
    """Same keys, other numerics (LayerNorm eps 1e-5, tanh GELU): refused unless named."""
    path = tmp_path / "t.safetensors"
    save_file(timm.create_model("test_convnext", num_classes=3).state_dict(), path)
    assert "--model test_convnext" in one_line_error(capsys, prune_main, "--checkpoint", path, "--list_groups")


def test_conv_mlp_variants_convert(tmp_path):
    """timm's atto..nano (1x1-conv MLP over LayerNorm2d) are our Linear-MLP ConvNeXt."""
    model = timm_model(conv_mlp=True)
    ours = models.build_model(models.infer_arch(models.our_layout(model.state_dict())))
    ours.load_state_dict(models.our_layout(model.state_dict()))
    assert torch.allclose(logits(ours), logits(model), atol=1e-5)


def test_a_named_stock_timm_model_keeps_its_own_layout(tmp_path):
    """--model of a stock timm model (given or saved in args) reads its layout unconverted."""
    stock = timm.create_model("convnext_atto", num_classes=3)
    held = read_held({"model": stock.state_dict(), "args": {"model": "convnext_atto"}})
    assert held.arch is None and held.name == "convnext_atto" and "stem.0.weight" in held.state


@pytest.mark.e2e
def test_prune_finetune_eval_and_export_of_timm_weights(timm_files, tmp_path, capsys):
    """prune.py keeping every channel, main.py --eval (against timm's own accuracy on the same
    images) and --finetune, and the ONNX export all read the timm-layout file."""
    model, _, st = timm_files
    kept = tmp_path / "kept.pth"
    assert prune_main([str(a) for a in ("--checkpoint", st, "--output", kept, "--dims", *SMALL["dims"],
                                        "--input_size", "32")]) == 0
    pruned, _ = load_held_model(kept)
    assert torch.allclose(logits(pruned), logits(model), atol=1e-5)

    import datasets
    data_args = datasets.default_data_args(data_set="DIGITS", input_size=32, nb_classes=10)
    loader = torch.utils.data.DataLoader(datasets.build_dataset(is_train=False, args=data_args)[0], batch_size=128)
    from engine import evaluate
    expected = evaluate(loader, model, torch.device("cpu"))["acc1"]
    recipe = ["--data_set", "DIGITS", "--input_size", "32", "--device", "cpu", "--num_workers", "0"]
    proc = run("main.py", "--eval", "true", "--finetune", st, *recipe)
    assert f"{expected:.5f}%" in proc.stderr + proc.stdout
    out = tmp_path / "ft"
    run("main.py", "--finetune", st, "--epochs", "1", "--output_dir", out, "--batch_size", "64",
        "--warmup_epochs", "0", "--aa", "none", "--reprob", "0", "--mixup", "0", "--cutmix", "0", *recipe)
    assert load_held_model(out / "checkpoint-0.pth")[1].arch["dims"] == list(SMALL["dims"])
    capsys.readouterr()
    assert run_cli(export_main, ["--checkpoint", str(st), "--output", str(tmp_path / "m.onnx"), "--input_size", "32"]) == 0
    assert "parity" in capsys.readouterr().out


# ----------------------------------------------------------------------------- safetensors files

def test_safetensors_round_trip_keeps_arch_args_and_refuses_nan(tmp_path):
    arch = {**models.FAMILIES["convnext"].example_arch()}
    model = models.build_model(arch)
    path = tmp_path / "w.safetensors"
    save_weights_file({"model": model.state_dict(), "arch": model.arch,
                                  "args": {"input_size": 48, "data_set": "DIGITS"}}, path)
    held = read_held(load_checkpoint_file(path))
    assert held.arch == model.arch and held.trained_input_size == 48       # multi-scale: from metadata
    bad = {k: v.clone() for k, v in model.state_dict().items()}
    bad["head.weight"][0, 0] = float("nan")
    save_file(bad, tmp_path / "nan.safetensors")
    with pytest.raises(UserError, match="NaN"):
        read_held(load_checkpoint_file(tmp_path / "nan.safetensors"))


@pytest.mark.parametrize("damage", ["truncated", "header", "metadata"])
def test_damaged_safetensors_get_one_line(timm_files, tmp_path, damage, capsys):
    data = timm_files[2].read_bytes()
    path = tmp_path / "bad.safetensors"
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "header":
        path.write_bytes((10 ** 9).to_bytes(8, "little") + data[8:])
    else:
        save_file({"w": torch.ones(2)}, path, metadata={"arch": "{not json"})
    assert "safetensors" in one_line_error(capsys, prune_main, "--checkpoint", path, "--list_groups")


@pytest.mark.e2e
def test_prune_writes_safetensors_weights(timm_files, tmp_path):
    out = tmp_path / "p.safetensors"
    run("pruning/prune.py", "--checkpoint", timm_files[1], "--output", out, "--dims", "16", "32", "48", "32",
        "--input_size", "32")
    ckpt = load_checkpoint_file(out)
    assert ckpt["arch"]["dims"] == [16, 32, 48, 32] and ckpt["pruning"]["criterion"] == "opnorm"
    with open(out, "rb") as f:
        assert f.read(1) != b"\x80" and b"PK" not in f.read(2)              # no pickle, no zip


@pytest.mark.e2e
def test_main_save_format_safetensors_twins_the_best_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    recipe = ["--data_set", "DIGITS", "--input_size", "32", "--device", "cpu", "--num_workers", "0"]
    run("main.py", "--model", "resnet20", "--epochs", "1", "--output_dir", out, "--save_format", "safetensors",
        "--batch_size", "128", "--warmup_epochs", "0", "--aa", "none", "--reprob", "0", "--mixup", "0",
        "--cutmix", "0", *recipe)
    best, twin = load_checkpoint_file(out / "checkpoint-best.pth"), out / "checkpoint-best.safetensors"
    weights = load_file(twin)
    assert set(weights) == set(best["model"]) and all(torch.equal(weights[k], best["model"][k]) for k in weights)
    logged = json.loads((out / "log.txt").read_text().splitlines()[-1])["test_acc1"]
    proc = run("main.py", "--eval", "true", "--resume", twin, *recipe)
    assert f"{logged:.5f}%" in proc.stderr + proc.stdout                  # --resume reads it
    from training.run_folder import RunFolder
    resumed = RunFolder(str(out), load_checkpoint_file(out / "checkpoint-0.pth"), str(out / "checkpoint-0.pth"))
    resumed.check(start_epoch=1)                                            # the twin is the run's own
    assert twin.name in resumed.owned
    with pytest.raises(UserError, match="already holds"):
        RunFolder(str(out)).check(start_epoch=0)                            # another run's: refused
    import main
    capsys.readouterr()
    assert main.cli(["--model", "resnet20", "--eval", "true", "--save_format", "safetensors", "--resume", str(twin),
                     *recipe]) == 2
    assert "--save_format safetensors applies to" in capsys.readouterr().err


# ----------------------------------------------------------------------------- timm's names

def test_timm_pretrained_names_load_through_timm_with_a_local_file(timm_files):
    """pretrained_cfg_overlay=dict(file=...) and a tag: timm's machinery, renamed into ours."""
    model, _, st = timm_files
    same = timm.create_model("convnext_tiny", pretrained=True, num_classes=10, **SMALL,
                             pretrained_cfg_overlay=dict(file=str(st), num_classes=10))
    assert isinstance(same, models.FAMILIES["convnext"])
    assert torch.allclose(logits(same), logits(model), atol=1e-5)
    tagged = timm.create_model("convnext_tiny.fb_in22k", pretrained=True, num_classes=5, **SMALL,
                               pretrained_cfg_overlay=dict(file=str(st)))
    assert tagged.head.weight.shape[0] == 5 and tagged.pretrained_cfg["tag"] == "fb_in22k"
    assert torch.equal(tagged.stages[2][1].pwconv1.weight, model.stages[2].blocks[1].mlp.fc1.weight)
    with pytest.raises(UserError, match="no pretrained weights"):
        timm.create_model("convnext_tiny_13M_pruned_cifar10", pretrained=True)
    with pytest.raises(UserError, match="unknown pretrained tag.*fb_in22k"):
        models.create_model("convnext_tiny.nosuchtag")


# ----------------------------------------------------------------------------- the Hub

class _Hub(http.server.BaseHTTPRequestHandler):
    """The two routes hf_hub_download uses: HEAD and GET /{org}/{name}/resolve/{rev}/{file}."""
    files = {}  # (repo, filename) -> bytes

    def do_HEAD(self):
        self._serve(body=False)

    def do_GET(self):
        self._serve(body=True)

    def _serve(self, body):
        parts = self.path.split("?")[0].strip("/").split("/")
        repo, filename = "/".join(parts[:2]), "/".join(parts[4:])
        data = self.files.get((repo, filename)) if len(parts) > 4 and parts[2] == "resolve" else None
        if data is None:
            known = any(r == repo for r, _ in self.files)
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound" if known else "RepoNotFound")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("X-Repo-Commit", "0" * 40)
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def hub_env(tmp_path_factory):
    """The environment of a process that talks to a Hub endpoint on 127.0.0.1 (own cache)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    home = tmp_path_factory.mktemp("hf_home")
    yield {**ENV, "HF_ENDPOINT": f"http://127.0.0.1:{server.server_address[1]}", "HF_HOME": str(home),
           "HF_HUB_DISABLE_TELEMETRY": "1"}
    server.shutdown()


@pytest.mark.e2e
def test_hf_hub_ids_are_fetched_cached_and_read_offline(timm_files, hub_env):
    _Hub.files[("org/small", "model.safetensors")] = timm_files[2].read_bytes()
    proc = run("pruning/prune.py", "--checkpoint", "hf-hub:org/small", "--list_groups", env=hub_env)
    assert "stages.3.residual" in proc.stdout
    offline = {**hub_env, "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}
    again = run("pruning/prune.py", "--checkpoint", "hf-hub:org/small@main", "--list_groups", env=offline)
    assert again.stdout == proc.stdout
    bad = run("pruning/prune.py", "--checkpoint", "hf-hub:org/absent", "--list_groups", env=hub_env, check=False)
    assert bad.returncode == 2 and "no such model repository" in bad.stderr and "Traceback" not in bad.stderr
    missing = run("pruning/prune.py", "--checkpoint", "hf-hub:org/other", "--list_groups", env=offline, check=False)
    assert missing.returncode == 2 and "not in the local Hugging Face cache" in missing.stderr


@pytest.mark.e2e
def test_a_tagged_name_offline_without_a_cached_copy_is_one_line(hub_env):
    offline = {**hub_env, "HF_HUB_OFFLINE": "1"}
    proc = run("main.py", "--model", "convnext_tiny.fb_in1k", "--eval", "true", "--data_set", "DIGITS",
               "--device", "cpu", "--input_size", "32", env=offline, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "1000-class head" in proc.stderr                    # --eval with a fresh head: refused first
    proc = run("main.py", "--model", "convnext_tiny.fb_in1k", "--epochs", "1", "--data_set", "DIGITS",
               "--device", "cpu", "--input_size", "32", env=offline, check=False)
    assert proc.returncode == 2 and "cannot fetch its pretrained weights" in proc.stderr.splitlines()[-1]
    assert "Traceback" not in proc.stderr


@pytest.mark.e2e
def test_tagged_name_downloads_timms_weights_from_the_hub(timm_files, hub_env, tmp_path):
    """`convnext_tiny.fb_in22k` after `import models`: timm's pretrained cfg, its hub id,
    timm's download, our layout; then a new 10-class head."""
    big = timm_model(classes=21841)
    save_file(big.state_dict(), tmp_path / "w.safetensors")
    _Hub.files[("timm/convnext_tiny.fb_in22k", "model.safetensors")] = (tmp_path / "w.safetensors").read_bytes()
    code = ("import sys, torch; import models, timm\n"
            f"m = timm.create_model('convnext_tiny.fb_in22k', pretrained=True, depths={SMALL['depths']}, "
            f"dims={SMALL['dims']}).eval()\n"
            "torch.manual_seed(1); x = torch.randn(4, 3, 32, 32)\n"
            "print(type(m).__module__, m.head.weight.shape[0]); torch.save(m(x).detach(), sys.argv[1])")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "out.pt")], cwd=ROOT, env=hub_env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["models.convnext", "21841"]
    assert torch.allclose(torch.load(tmp_path / "out.pt"), logits(big), atol=1e-5)


# ----------------------------------------------------------------------------- the timm folder

_TIMM_ONLY = """
import sys, torch, timm
m = timm.create_model("local-dir:" + sys.argv[1], pretrained=True).eval()
assert "models" not in sys.modules
torch.manual_seed(1)
with torch.no_grad():
    torch.save(m(torch.randn(4, 3, int(sys.argv[2]), int(sys.argv[2]))), sys.argv[3])
print(type(m).__module__)
backbone = timm.create_model("local-dir:" + sys.argv[1], pretrained=True, features_only=True).eval()
with torch.no_grad():
    maps = backbone(torch.randn(1, 3, 64, 64))
print(backbone.feature_info.channels(), [m.shape[1] for m in maps], backbone.feature_info.reduction())
"""


@pytest.mark.e2e
@pytest.mark.parametrize("name", ["convnext_tiny_13M_pruned_cifar10", "convnext_tiny_3M_pruned_cifar10"])
def test_export_folder_loads_with_timm_alone(name, tmp_path, capsys):
    torch.manual_seed(0)
    model = models.create_model(name, layer_scale_init_value=0.3).eval()
    ckpt = tmp_path / "c.pth"
    save_checkpoint_file({"model": model.state_dict(), "arch": model.arch,
                                     "args": {"input_size": 32, "data_set": "DIGITS"}}, ckpt)
    folder = tmp_path / "folder"
    assert run_cli(export_main, ["--checkpoint", str(ckpt), "--format", "timm", "--output", str(folder)]) == 0
    assert "timm alone loads it" in capsys.readouterr().out
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "convnext_tiny" and config["pretrained_cfg"]["input_size"] == [3, 32, 32]
    proc = subprocess.run([sys.executable, "-I", "-c", _TIMM_ONLY, str(folder), "32", str(tmp_path / "o.pt")],
                          cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    module, channels = proc.stdout.strip().split("\n", 1)
    assert module == "timm.models.convnext"
    # a backbone in a Python that imports only timm: the pruned stage widths, strides 4 to 32
    widths = model.arch["dims"]
    assert channels == f"{widths} {widths} [4, 8, 16, 32]"
    assert torch.allclose(torch.load(tmp_path / "o.pt"), logits(model), atol=1e-5)
    card = (folder / "README.md").read_text()
    assert hashlib.sha256(ckpt.read_bytes()).hexdigest() in card and f"{models.count_params(model):,}" in card


@pytest.mark.parametrize("arch", [
    {"family": "convnext", "depths": [1, 2], "dims": [8, 12], "hidden": [[32], [48, 20]], "num_classes": 3},
    models.default_arch("resnet56"),
])
def test_export_folder_of_other_shapes_loads_once_models_is_imported(arch, tmp_path):
    model = models.build_model(arch).eval()
    held = read_held({"model": model.state_dict(), "arch": model.arch})
    import datasets
    folder = tmp_path / "f"
    out = hub.write_folder(model, held, folder, datasets.default_data_args(input_size=32))
    assert not out.timm_only and json.loads((folder / "config.json").read_text())["architecture"] == models.ARCH_FACTORY
    again = timm.create_model(f"local-dir:{folder}", pretrained=True)
    assert torch.allclose(logits(again), logits(model), atol=1e-5)
    assert "import models" in (folder / "README.md").read_text()
    backbone = timm.create_model(f"local-dir:{folder}", pretrained=True, features_only=True).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():  # the folder's weights, as a backbone
        maps = backbone(x)
        _, expected = model.forward_intermediates(x)
    assert backbone.feature_info.channels() == [i["num_chs"] for i in model.feature_info]
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(maps, expected)) and len(maps) == len(expected)


def test_a_malformed_hub_id_is_one_line(capsys):
    assert "expected hf-hub:ORG/NAME" in one_line_error(capsys, prune_main, "--checkpoint", "hf-hub:nobody",
                                                        "--list_groups")


def test_export_folder_refuses_to_clobber(tmp_path, timm_files, capsys):
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    argv = ["--checkpoint", timm_files[1], "--format", "timm", "--output", folder, "--input_size", "32"]
    assert "not empty" in one_line_error(capsys, export_main, *argv)
    assert run_cli(export_main, [str(a) for a in argv] + ["--overwrite"]) == 0
    assert (folder / "notes.txt").read_text() == "mine" and (folder / "model.safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    for flag in ("--fold", "--dynamic_size", "--max_drop 2", "--calib_batches 2", "--seed 3", "--eval_images 9"):
        error = one_line_error(capsys, export_main, *argv[:5], tmp_path / "g", *flag.split())
        assert "apply to --format onnx" in error and flag.split()[0] in error


PROBES = {
    "find_spec before import": "importlib.util.find_spec('timm'); import timm",
    "import_module": "importlib.util.find_spec('timm'); importlib.import_module('timm'); import timm",
    "two probes, then a submodule first": ("importlib.util.find_spec('timm'); importlib.util.find_spec('timm'); "
                                           "import timm.models; import timm"),
}


@pytest.mark.e2e
@pytest.mark.parametrize("order", ["models first", "timm first"])
@pytest.mark.parametrize("probe", list(PROBES))
def test_our_names_are_in_timms_registry_whatever_probes_run(probe, order):
    """Availability probes (importlib.util.find_spec, as transformers or lightning run them at
    import time) must not undo the registration; in either import order."""
    body = (f"import models\n{PROBES[probe].replace('; ', chr(10))}\n" if order == "models first"
            else f"{PROBES[probe].replace('; ', chr(10))}\nimport models\n")
    code = ("import importlib, importlib.util\n" + body
            + "m = timm.create_model('convnext_tiny_13M_pruned_cifar10')\nprint(m.arch['dims'])\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[96, 192, 384, 192]"

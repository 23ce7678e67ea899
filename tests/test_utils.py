"""utils.py: schedules, logging, distributed helpers, AMP scaler, checkpoint save / resume / load."""
import argparse
import logging
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from timm.utils import ModelEmaV3

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import models  # noqa: E402
import utils  # noqa: E402
from utils import UserError  # noqa: E402

TINY_ARCH = {"family": "convnext", "depths": [1, 1, 1, 1], "dims": [8, 16, 24, 32], "hidden": None,
             "dw": "standard", "dw_branches": None, "num_classes": 10, "in_chans": 3}


def tiny_model(**overrides):
    return models.build_model({**TINY_ARCH, **overrides})


def run_args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), save_ckpt_num=2, auto_resume=True, resume="", eval=False,
                start_epoch=0, model_ema=False)
    return argparse.Namespace(**{**base, **kw})


# ----------------------------------------------------------------------------- small helpers

def test_str2bool():
    assert utils.str2bool("true") and utils.str2bool("Y") and utils.str2bool("1")
    assert not utils.str2bool("false") and not utils.str2bool("0") and not utils.str2bool("No")
    with pytest.raises(argparse.ArgumentTypeError):
        utils.str2bool("maybe")


def test_cosine_scheduler_warmup_and_ends():
    s = utils.cosine_scheduler(1.0, 0.1, epochs=4, niter_per_ep=5, warmup_epochs=1)
    assert len(s) == 20
    assert s[0] == 0 and s[4] == pytest.approx(1.0)   # linear warmup over the first epoch
    assert s[5] == pytest.approx(1.0) and s[-1] == pytest.approx(0.1, abs=0.01)
    assert all(a >= b for a, b in zip(s[5:], s[6:]))   # cosine decays monotonically


def test_cosine_scheduler_warmup_steps_override():
    # warmup_steps > 0 overrides warmup_epochs, also when warmup_epochs is 0
    s = utils.cosine_scheduler(2.0, 0.0, epochs=2, niter_per_ep=10, warmup_epochs=0, warmup_steps=3)
    assert len(s) == 20 and list(s[:3]) == pytest.approx([0.0, 1.0, 2.0])
    flat = utils.cosine_scheduler(2.0, 2.0, epochs=1, niter_per_ep=4)
    assert list(flat) == pytest.approx([2.0] * 4)


def test_metric_logger_and_log_every(caplog):
    ml = utils.MetricLogger(delimiter="  ")
    ml.update(loss=2.0, acc=None)
    ml.update(loss=4.0)
    assert ml.loss.global_avg == 3.0 and ml.loss.median == 3.0 and "acc" not in ml.meters
    with caplog.at_level(logging.INFO, logger="utils"):
        items = list(ml.log_every(range(5), 2, header="Epoch: [0]"))
    assert items == list(range(5))
    lines = [r.getMessage() for r in caplog.records if "eta:" in r.getMessage()]
    assert len(lines) == 3 and "[0/5]" in lines[0] and "[4/5]" in lines[-1]  # items 0, 2, 4


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_single_process_distributed_defaults(monkeypatch, restore_logging):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(key, raising=False)
    args = argparse.Namespace(dist_on_itp=False, local_rank=-1, world_size=1, dist_url="env://",
                              device="cpu")
    utils.init_distributed_mode(args)
    assert args.distributed is False and utils.get_world_size() == 1 and utils.is_main_process()


@pytest.mark.parametrize("n,world", [(7, 2), (359, 2), (10, 3), (2, 4), (360, 2)])
def test_num_real_samples_partitions_odd_sets_exactly(n, world):
    data = list(range(n))
    seen = []
    for rank in range(world):
        for shuffle in (False, True):
            sampler = torch.utils.data.DistributedSampler(data, world, rank, shuffle=shuffle, seed=3)
            if not shuffle:
                seen += list(sampler)[:utils.num_real_samples(sampler)]
            real = list(sampler)[:utils.num_real_samples(sampler)]
            assert len(set(real)) == len(real)
    assert sorted(seen) == data   # every sample exactly once, padding dropped
    assert utils.num_real_samples(torch.utils.data.SequentialSampler(data)) == n


def test_tensorboard_logger_writes_events(tmp_path):
    tb = utils.TensorboardLogger(str(tmp_path))
    tb.set_step(3)
    tb.update(head="loss", loss=torch.tensor(1.5), skipped=None)
    tb.flush()
    assert any(p.name.startswith("events.out.tfevents") for p in tmp_path.iterdir())


def test_wandb_missing_is_a_user_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)   # import wandb -> ImportError
    with pytest.raises(UserError, match="pip install wandb"):
        utils.WandbLogger(argparse.Namespace(project="x", output_dir=""))


# ----------------------------------------------------------------------------- AMP scaler

def test_scaler_without_amp_clips_and_steps():
    lin = torch.nn.Linear(4, 1, bias=False)
    lin.weight.data.zero_()
    opt = torch.optim.SGD(lin.parameters(), lr=1.0)
    scaler = utils.NativeScalerWithGradNormCount(enabled=False, device="cpu")
    loss = (lin(torch.full((1, 4), 10.0)) - 100.0).pow(2).sum()
    norm = scaler(loss, opt, clip_grad=0.5, parameters=lin.parameters())
    assert float(norm) == pytest.approx(4000.0)        # pre-clip norm: 2 * 100 * 10 * sqrt(4)
    assert lin.weight.norm().item() == pytest.approx(0.5, rel=1e-4)  # step of the clipped grad
    assert scaler(loss.detach().requires_grad_(), opt, update_grad=False) is None
    assert scaler.state_dict() == {}
    scaler.load_state_dict({})


# ----------------------------------------------------------------------------- checkpoint files

def test_load_refuses_urls_missing_and_truncated(tmp_path):
    with pytest.raises(UserError, match="no network"):
        utils.load_checkpoint_file("https://dl.fbaipublicfiles.com/convnext/convnext_tiny_1k_224.pth")
    with pytest.raises(UserError, match="not found"):
        utils.load_checkpoint_file(tmp_path / "none.pth")
    good = tmp_path / "good.pth"
    utils.save_checkpoint_file({"model": tiny_model().state_dict()}, good)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(UserError, match="truncated"):
        utils.load_checkpoint_file(cut)


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
        utils.load_checkpoint_file(evil)
    assert not marker.exists()


def test_official_format_loads(tmp_path):
    path = tmp_path / "official.pth"
    ns = argparse.Namespace(model="convnext_tiny", lr=np.float64(4e-3), input_size=224)
    torch.save({"model": tiny_model().state_dict(), "epoch": "best", "args": ns}, path)
    ckpt = utils.load_checkpoint_file(path)
    assert isinstance(ckpt["args"], argparse.Namespace) and ckpt["epoch"] == "best"


def test_save_model_keeps_last_n_and_stores_plain_args(tmp_path):
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters())
    scaler = utils.NativeScalerWithGradNormCount(enabled=False, device="cpu")
    args = run_args(tmp_path, job_dir=Path("/x/y"), save_ckpt_num=2)
    for epoch in range(4):
        utils.save_model(args, epoch, model, opt, scaler, max_accuracy=10.0 * epoch)
    utils.save_model(args, "best", model, opt, scaler, max_accuracy=30.0)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["checkpoint-2.pth", "checkpoint-3.pth", "checkpoint-best.pth"]
    ckpt = utils.load_checkpoint_file(tmp_path / "checkpoint-3.pth")
    assert ckpt["epoch"] == 3 and ckpt["max_accuracy"] == 30.0 and ckpt["arch"] == model.arch
    assert isinstance(ckpt["args"], dict) and ckpt["args"]["job_dir"] == "/x/y"
    assert set(ckpt) >= {"model", "optimizer", "epoch", "scaler", "args", "arch", "max_accuracy"}
    assert not any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())


def test_auto_resume_restores_everything(tmp_path):
    torch.manual_seed(0)
    model = tiny_model()
    ema = ModelEmaV3(model, decay=0.5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    ema.update(model)
    scaler = utils.NativeScalerWithGradNormCount(enabled=False, device="cpu")
    args = run_args(tmp_path, model_ema=True)
    utils.save_model(args, 4, model, opt, scaler, model_ema=ema, max_accuracy=55.5, max_accuracy_ema=44.0)

    fresh = tiny_model()
    fresh_ema = ModelEmaV3(fresh, decay=0.5)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    args = run_args(tmp_path, model_ema=True)
    restored = utils.auto_load_model(args, fresh, fresh_opt, scaler, fresh_ema)
    assert args.resume.endswith("checkpoint-4.pth") and args.start_epoch == 5
    assert restored == {"max_accuracy": 55.5, "max_accuracy_ema": 44.0}
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(ema.module.state_dict().values(), fresh_ema.module.state_dict().values()):
        assert torch.equal(a, b)
    assert fresh_opt.state_dict()["state"][0]["step"] == 1


def test_resume_training_from_best_is_refused(tmp_path):
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters())
    scaler = utils.NativeScalerWithGradNormCount(enabled=False, device="cpu")
    utils.save_model(run_args(tmp_path), "best", model, opt, scaler)
    args = run_args(tmp_path, resume=str(tmp_path / "checkpoint-best.pth"))
    with pytest.raises(UserError, match="--finetune"):
        utils.auto_load_model(args, tiny_model(), torch.optim.AdamW(model.parameters()), scaler)
    args = run_args(tmp_path, resume=str(tmp_path / "checkpoint-best.pth"), eval=True)
    utils.auto_load_model(args, tiny_model(), None, scaler)   # evaluation is fine


# ----------------------------------------------------------------------------- state dicts

def test_model_state_key_and_prefix():
    sd = tiny_model().state_dict()
    ckpt = {"model_ema": {f"backbone.{k}": v for k, v in sd.items()}, "epoch": 1}
    got = utils.model_state(ckpt, "model|model_ema", "backbone.")
    assert set(got) == set(sd)
    assert set(utils.model_state(sd)) == set(sd)          # a bare state dict
    with pytest.raises(UserError, match="no weights"):
        utils.model_state({"epoch": 3})


def test_finetune_drops_a_head_of_another_class_count():
    src = tiny_model(num_classes=100).state_dict()
    model = tiny_model(num_classes=10)
    head = model.head.weight.clone()
    utils.load_model_state(model, src, "--finetune x.pth", drop_head_on_mismatch=True)
    assert torch.equal(model.head.weight, head)   # fresh head kept
    assert torch.equal(model.stages[0][0].pwconv1.weight, src["stages.0.0.pwconv1.weight"])
    with pytest.raises(UserError, match=r"head.weight is \[100, 32\] in the checkpoint"):
        utils.load_model_state(tiny_model(num_classes=10), src, "--resume x.pth")


def test_other_shape_mismatch_names_tensors_and_checkpoint_shape():
    src = tiny_model(dims=[8, 16, 24, 16]).state_dict()
    with pytest.raises(UserError) as err:
        utils.load_model_state(tiny_model(), src, "--finetune pruned.pth", drop_head_on_mismatch=True)
    msg = str(err.value)
    assert "stages.3.0" in msg or "downsample_layers.3" in msg
    assert "in the checkpoint" in msg and "dims [8, 16, 24, 16]" in msg
    partial = {k: v for k, v in tiny_model().state_dict().items() if not k.startswith("stages.1")}
    with pytest.raises(UserError, match="missing tensors: stages.1"):
        utils.load_model_state(tiny_model(), partial, "--finetune part.pth", drop_head_on_mismatch=True)


def test_only_the_main_process_writes_checkpoints(tmp_path, monkeypatch):
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters())
    scaler = utils.NativeScalerWithGradNormCount(enabled=False, device="cpu")
    monkeypatch.setattr(utils, "get_rank", lambda: 1)
    utils.save_model(run_args(tmp_path), 0, model, opt, scaler)
    assert list(tmp_path.iterdir()) == []


def test_finetune_refuses_unused_tensors_and_drops_any_timm_head():
    import timm
    src = tiny_model().state_dict()
    no_scale = tiny_model(layer_scale=False)
    with pytest.raises(UserError, match="unexpected tensors: .*gamma"):
        utils.load_model_state(no_scale, src, "--finetune x.pth", drop_head_on_mismatch=True)
    resnet = timm.create_model("resnet18", num_classes=3)
    utils.load_model_state(resnet, timm.create_model("resnet18", num_classes=7).state_dict(),
                           "--finetune r.pth", drop_head_on_mismatch=True)
    assert resnet.fc.out_features == 3

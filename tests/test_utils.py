"""utils.py: flag parsing, schedules, logging, distributed helpers, AMP scaler."""
import argparse
import logging
import sys

import pytest
import torch

import utils
from common.errors import UserError


# ----------------------------------------------------------------------------- small helpers

def test_str2bool():
    from cli.flags import str2bool
    assert str2bool("true") and str2bool("Y") and str2bool("1")
    assert not str2bool("false") and not str2bool("0") and not str2bool("No")
    with pytest.raises(argparse.ArgumentTypeError):
        str2bool("maybe")


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

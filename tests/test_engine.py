"""engine.py on tiny models: accumulation, clipping, schedules, EMA, NaN stop, exact evaluation."""
import math

import pytest
import torch
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.utils import ModelEmaV3

import models
import utils
from engine import NonFiniteLossError, evaluate, train_one_epoch

CPU = torch.device("cpu")


def tiny_net(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.GELU(), torch.nn.Flatten(),
                               torch.nn.Linear(4 * 6 * 6, 5))


def batches(n_batches, batch_size, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_batches * batch_size, 3, 8, 8, generator=g)
    y = torch.randint(0, 5, (n_batches * batch_size,), generator=g)
    return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(x), batch_size)]


def run_epoch(model, data, optimizer, **kw):
    scaler = kw.pop("scaler", utils.NativeScalerWithGradNormCount(enabled=False, device="cpu"))
    criterion = kw.pop("criterion", torch.nn.CrossEntropyLoss())
    return train_one_epoch(model, criterion, data, optimizer, CPU, 0, scaler, **kw)


def test_update_freq_equals_a_bigger_batch():
    small, big = tiny_net(), tiny_net()
    data = batches(8, 4)
    merged = [(torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]])) for a, b in zip(data[::2], data[1::2])]
    opt_small = torch.optim.SGD(small.parameters(), lr=0.1, momentum=0.9)
    opt_big = torch.optim.SGD(big.parameters(), lr=0.1, momentum=0.9)
    run_epoch(small, data, opt_small, update_freq=2, num_training_steps_per_epoch=4)
    run_epoch(big, merged, opt_big, update_freq=1, num_training_steps_per_epoch=4)
    for a, b in zip(small.parameters(), big.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert opt_small.state[next(small.parameters())]["momentum_buffer"] is not None


def test_clip_grad_without_amp():
    model = tiny_net()
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    stats = run_epoch(model, batches(1, 8), opt, max_norm=1e-3, print_freq=1)
    step = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)])
    assert step.norm().item() == pytest.approx(1e-3, rel=1e-3)   # lr 1 x clipped gradient
    assert stats["grad_norm"] > 1e-3                              # the norm before clipping


def test_schedules_are_applied_per_step_with_lr_scale():
    model = tiny_net()
    groups = [{"params": list(model[0].parameters()), "lr_scale": 0.5, "weight_decay": 0.1},
              {"params": list(model[3].parameters()), "lr_scale": 1.0, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=1.0)
    lr = [0.4, 0.3, 0.2, 0.1, 0.05]
    wd = [0.5, 0.4, 0.3, 0.2, 0.1]
    stats = run_epoch(model, batches(6, 2), opt, update_freq=2, start_steps=1,
                      lr_schedule_values=lr, wd_schedule_values=wd, num_training_steps_per_epoch=3)
    # the last of 3 steps (global step 1 + 2 = 3) set these values
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05) and opt.param_groups[1]["lr"] == 0.1
    assert opt.param_groups[0]["weight_decay"] == 0.2 and opt.param_groups[1]["weight_decay"] == 0.0
    # epoch averages over iterations of the max / min group LR: steps 1, 2, 3 -> 0.3, 0.2, 0.1
    assert stats["lr"] == pytest.approx(0.2) and stats["min_lr"] == pytest.approx(0.1)


def test_ema_mixup_and_bf16_autocast_on_cpu():
    model = models.build_model({"family": "convnext", "depths": [1, 1], "dims": [8, 16], "hidden": None,
                                "dw": "standard", "dw_branches": None, "num_classes": 5, "in_chans": 3})
    ema = ModelEmaV3(model, decay=0.5)
    ema_before = [p.clone() for p in ema.module.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=5)
    data = [(torch.randn(4, 3, 16, 16), torch.randint(0, 5, (4,))) for _ in range(3)]
    stats = run_epoch(model, data, opt, model_ema=ema, mixup_fn=mixup, criterion=SoftTargetCrossEntropy(),
                      use_amp=True, amp_dtype=torch.bfloat16, channels_last=True)
    assert math.isfinite(stats["loss"]) and "class_acc" not in stats   # no accuracy under mixup
    assert any(not torch.equal(a, b) for a, b in zip(ema_before, ema.module.parameters()))
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_nan_loss_stops_with_a_clear_error():
    def nan_after_two(output, target, calls=[0]):
        calls[0] += 1
        loss = torch.nn.functional.cross_entropy(output, target)
        return loss * float("nan") if calls[0] > 2 else loss

    with pytest.raises(NonFiniteLossError, match=r"loss is nan at epoch 0, iteration 2"):
        run_epoch(tiny_net(), batches(6, 2), torch.optim.SGD(tiny_net().parameters(), lr=0.1),
                  criterion=nan_after_two, print_freq=3)


def test_one_host_transfer_per_log_interval(monkeypatch):
    counts = {"item": 0, "tolist": 0}
    item, tolist = torch.Tensor.item, torch.Tensor.tolist

    def counting(name, fn):
        def wrapper(self, *a, **k):
            counts[name] += 1
            return fn(self, *a, **k)
        return wrapper

    model = tiny_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    monkeypatch.setattr(torch.Tensor, "item", counting("item", item))
    monkeypatch.setattr(torch.Tensor, "tolist", counting("tolist", tolist))
    run_epoch(model, batches(20, 2), opt, print_freq=5)
    assert counts["item"] == 0
    assert counts["tolist"] <= 20 // 5 + 1   # one per log line (iterations 0, 5, 10, 15, 19)


class Tagged(torch.utils.data.Dataset):
    """Image i is constant i: a model that reads the value 'predicts' label i % 3 exactly."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.full((1, 2, 2), float(i)), i % 3


class ModOracle(torch.nn.Module):
    """Predicts class (value mod 3), except for every 4th image, where it is wrong."""

    def forward(self, x):
        v = x.flatten(1)[:, 0].long()
        cls = torch.where(v % 4 == 0, (v + 1) % 3, v % 3)
        return torch.nn.functional.one_hot(cls, 3).float() * 5


@pytest.mark.parametrize("n,world", [(7, 2), (11, 3), (360, 2), (1, 2)])
def test_distributed_evaluation_counts_each_sample_once(n, world):
    data = Tagged(n)
    full = evaluate(torch.utils.data.DataLoader(data, batch_size=4), ModOracle(), CPU)
    assert full["num_images"] == n
    assert full["acc1"] == pytest.approx(100.0 * sum(i % 4 != 0 for i in range(n)) / n)
    hits = total = 0
    for rank in range(world):   # each rank's share, as under dist_eval (sums are all-reduced)
        sampler = torch.utils.data.DistributedSampler(data, world, rank, shuffle=False)
        stats = evaluate(torch.utils.data.DataLoader(data, batch_size=2, sampler=sampler), ModOracle(), CPU)
        hits += stats["acc1"] * stats["num_images"] / 100
        total += stats["num_images"]
    assert total == n
    assert 100.0 * hits / total == pytest.approx(full["acc1"])

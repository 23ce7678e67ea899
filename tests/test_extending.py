"""The declared extension points beyond criteria: a keep-rule budget added by one
registration reaches KeepRules, prune.py's flags, the plan, the checkpoint's record and the
studies' --budgets (a runtime added the same way: tests/test_latency.py's known-cost one)."""
import pytest
import torch

import models
from checkpoints.io import load_checkpoint_file, save_checkpoint_file
from cli.compare_criteria import budget_argv
from cli.prune import main as prune_main
from common.errors import UserError
from pruning import KeepRules, PruneSpec, prune
from pruning.rules import BUDGETS, Budget, register_budget

ARCH = {"family": "convnext", "depths": [1, 1, 1, 1], "dims": [8, 16, 24, 32], "num_classes": 10}


@pytest.fixture
def channels_budget():
    """A toy budget: keep at most N channels in the ranked groups."""
    budget = register_budget(Budget(
        "target_channels", "prune until at most N channels of the ranked groups are kept", parse=int,
        check=lambda n: None if isinstance(n, int) and n > 0 else f"must be a positive whole number, got {n!r}",
        meets=lambda n, shape: shape.kept <= n,
        reached=lambda shape: f"the smallest reachable shape keeps {shape.kept} channels",
        short="channels", from_share=lambda share, arch, size: 7))
    yield budget
    del BUDGETS[budget.name]


@pytest.fixture
def src(tmp_path):
    torch.manual_seed(0)
    model = models.build_model(ARCH)
    path = tmp_path / "src.pth"
    save_checkpoint_file({"model": model.state_dict(), "arch": model.arch, "args": {"input_size": 32}}, path)
    return path


def test_a_registered_budget_plans_and_is_recorded(channels_budget, src):
    result = prune(str(src), PruneSpec(rules=KeepRules(target_channels=100)))
    kept = sum(len(k) for k in result.keep.values())
    total = sum(g.width for g in result.source.groups)
    assert kept <= 100 < total
    assert result.checkpoint["pruning"]["options"]["target_channels"] == 100
    with pytest.raises(UserError, match="KeepRules.target_channels must be a positive whole number"):
        KeepRules(target_channels=0)
    with pytest.raises(UserError, match="target cannot be met: the smallest reachable shape keeps"):
        prune(str(src), PruneSpec(rules=KeepRules(target_channels=1)))


@pytest.mark.cli
def test_a_registered_budget_is_a_flag_and_a_study_budget(channels_budget, src, tmp_path):
    out = tmp_path / "small.pth"
    assert prune_main(["--checkpoint", str(src), "--output", str(out), "--target_channels", "90"]) == 0
    assert load_checkpoint_file(out)["pruning"]["options"]["target_channels"] == 90
    assert budget_argv("channels=0.5", ARCH, 32) == ["--target_channels", "7"]


def test_without_registration_the_rule_is_unknown():
    with pytest.raises(TypeError, match="unknown rules target_channels"):
        KeepRules(target_channels=5)

"""Budget keep rules: the groups no other rule fixes are ranked in one global list and
channels go, worst first, until every budget given is met (pruning/plan.py's search).

A budget is a declared type, like a Criterion: one `Budget` and one `register_budget` call
add one, and then `KeepRules(name=value)`, prune.py's `--name`, the studies' `--budgets
short=S` and the checkpoint's `pruning.options` record all take it. Importable without torch
(prune.py builds its flags from this registry before torch loads).

Latency targets also rank globally, but they are measured and re-planned (pruning/latency.py),
so they are KeepRules settings of their own, not budgets.
"""
import argparse
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field

from common.registry import Registry


@dataclass
class Shape:
    """A candidate plan as a budget sees it: the kept channels of the ranked groups and, on
    demand, the pruned model's (params, MACs) (costs.CostModel, computed once)."""
    keep: dict            # every group's kept indices
    kept: int             # channels kept in the ranked groups
    total: int            # channels the ranked groups have
    cost_model: Callable | None = None
    _cost: tuple | None = field(default=None, repr=False)

    def cost(self):
        if self.cost_model is None:
            raise ValueError("this budget reads params / MACs: plan_keep needs a cost_model")
        if self._cost is None:
            self._cost = self.cost_model(self.keep)
        return self._cost


@dataclass(frozen=True)
class Budget:
    """One budget rule.

    name: the KeepRules field and the flag (--name).
    help: the flag's help.
    parse: flag text -> value (an argparse type).
    check: value -> None, or what is wrong with it (range checks, before any work).
    meets: (value, Shape) -> whether the shape is within the budget.
    reached: Shape -> what the smallest reachable shape reaches (the 'cannot be met' message).
    reads_cost: meets / reached call Shape.cost() (a CostModel is built for it).
    short / from_share: the studies' `--budgets short=S` form: S, a share in (0, 1), -> value
        for this source (arch, input_size); None when the studies do not offer the rule.
    """
    name: str
    help: str
    parse: Callable
    check: Callable
    meets: Callable
    reached: Callable
    metavar: str = "N"
    reads_cost: bool = False
    short: str | None = None
    from_share: Callable | None = None


BUDGETS = Registry("budget", Budget)


def register_budget(budget, replace_existing=False):
    """Add a Budget under its name (a second one of that name needs replace_existing); returns it."""
    return BUDGETS.register(budget, replace_existing)


def budgets():
    return tuple(BUDGETS.values())


def count(text):
    """'13.5M' / '4.4G' / '13564330' -> a positive int (argparse type)."""
    scale = {"K": 1e3, "M": 1e6, "G": 1e9}.get(text[-1:].upper(), 1)
    try:
        value = float(text[:-1] if scale != 1 else text) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a count: {text!r} (e.g. 13564330, 13.5M, 4.4G)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
    return int(value)


def _positive_count(value):
    whole = isinstance(value, numbers.Integral) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not whole:
        return f"must be a whole number, got {value!r}"
    return None if value > 0 else f"must be positive, got {value}"


def _ratio_check(value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return f"must be a number, got {value!r}"
    return None if 0 <= value < 1 else f"must be in [0, 1), got {value}"


def _count_of(index):
    def from_share(share, arch, input_size):
        import models
        return int(share * models.count_arch(arch, input_size)[index])
    return from_share


register_budget(Budget(
    "target_params", "prune until params <= N (global ranking)", parse=count, check=_positive_count,
    meets=lambda n, shape: shape.cost()[0] <= n,
    reached=lambda shape: f"the smallest reachable shape has {shape.cost()[0]:,} params",
    reads_cost=True, short="params", from_share=_count_of(0)))
register_budget(Budget(
    "target_macs", "prune until MACs at --input_size <= N", parse=count, check=_positive_count,
    meets=lambda n, shape: shape.cost()[1] <= n,
    reached=lambda shape: f"the smallest reachable shape has {shape.cost()[1]:,} MACs",
    reads_cost=True, short="macs", from_share=_count_of(1)))
register_budget(Budget(
    "ratio", "prune this share of the channels of the ranked groups", parse=float, check=_ratio_check,
    meets=lambda r, shape: shape.kept <= (1 - r) * shape.total + 1e-9,
    reached=lambda shape: f"at most {1 - shape.kept / shape.total:.4f} of the ranked channels can go",
    metavar="R", short="ratio", from_share=lambda share, arch, input_size: share))

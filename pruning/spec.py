"""The typed settings of one pruning: keep rules, calibration, and the whole spec.

`PruneSpec` is what `pruning.prune`, prune.py and the studies pass around. Values are
range-checked when a spec is made (before any checkpoint is read); `PruneSpec.resolved()`
then fills the criterion's defaults and refuses every option that does not apply to the
criterion, so nothing given is silently dropped, and `record()` is what the pruned
checkpoint stores as `pruning.options`: the settings actually used.
"""
from dataclasses import asdict, dataclass, field, replace

from common.config import Choice, FieldError, Range, check_value
from common.errors import UserError
from deploy.runtime import get_runtime, runtime_names

from .blocks import check_block_score
from .criteria import Aggregation, Criterion, get_criterion
from .rules import budgets

# What is done after the cut (pruning/compensate.py), by --compensate name
COMPENSATIONS = {
    "none": "nothing",
    "stats": "each LayerNorm's affine refit to the dense model's normalised outputs, BatchNorm statistics re-measured",
    "refit": "stats, and each layer reading a LayerNorm refit by least squares to the dense outputs"}


def _tuple(value, name="value"):
    """A list-like rule value as a tuple; a single number or a string is refused naming the rule."""
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise FieldError("KeepRules", name, f"takes a list, got {value!r}")
    return tuple(value)


# KeepRules' own settings and their defaults; the registered budgets (pruning/rules.py) join them
SETTINGS = {"dims": None, "hidden_ratio": None, "mlp_ratio": None, "group_ratio": None, "round_to": 1,
            "depths": None, "remove_blocks": None, "drop_blocks": None, "prune_depth": False,
            "target_latency": None, "target_speedup": None, "latency_backend": "eager", "latency_batch": 1,
            "latency_dtype": "fp32"}


# KeepRules' settings and their allowed values (the budgets check their own)
_RANGES = {"round_to": Range(1, integer=True), "hidden_ratio": Range(0, 1, lo_open=True), "mlp_ratio": Range(0, lo_open=True),
           "dims": Range(1, integer=True), "depths": Range(1, integer=True), "remove_blocks": Range(1, integer=True),
           "target_latency": Range(0, 1e7, lo_open=True), "target_speedup": Range(1, 1000, lo_open=True),
           "latency_batch": Range(1, integer=True), "latency_dtype": Choice(("fp32", "bf16"))}


def _values(value):
    return value if isinstance(value, tuple) else (value,)


def rule_names():
    """Every KeepRules field: its settings, then the registered budgets."""
    return (*SETTINGS, *(b.name for b in budgets()))


class KeepRules:
    """Which channels survive (docs/design.md section 6); the rules compose. Keyword-only,
    frozen; attributes by name (rules.dims, rules.ratio, ...).

    dims: residual width per stage (one number for an isotropic model).
    hidden_ratio: share of each block's hidden (MLP / inner) channels kept: one value, or one
        per stage.
    mlp_ratio: each block's hidden width = this x its stage's new residual width: one value,
        or one per stage.
    group_ratio: [(glob, R)]: prune share R of every group whose name matches (later wins).
    budgets, one field each (pruning/rules.py: target_params, target_macs, ratio and any
        registered one): global ranking of the groups left free until every budget is met.
    round_to: widths chosen by a ratio or a target round up to a multiple of this.
    target_latency / target_speedup: global ranking until one batch runs in <= this many ms,
        or this many times faster than the source, measured on
        this machine (pruning/latency.py) in latency_backend (a registered Runtime) at
        latency_batch images in latency_dtype (fp32, or bf16 autocast in eager / compile).
    depths: blocks kept per stage (depth pruning: the criterion's block scores pick which go).
    remove_blocks: remove this many blocks, lowest block scores first, over the whole model.
    drop_blocks: remove these blocks, by name (prune.py --list_groups; sensitivity.py --blocks).
    prune_depth: with a latency target, the planner also removes blocks where a block's score
        per millisecond saved is lower than narrowing's (pruning/plan.py).
    """
    __slots__ = ("_values",)

    def __init__(self, **values):
        unknown = sorted(set(values) - set(rule_names()))
        if unknown:
            raise TypeError(f"KeepRules got unknown rules {', '.join(unknown)}; "
                            f"known: {', '.join(rule_names())}")
        v = {name: values.get(name, SETTINGS.get(name)) for name in rule_names()}
        for name in ("dims", "hidden_ratio", "mlp_ratio", "depths", "drop_blocks"):
            v[name] = _tuple(v[name], name)
        v["drop_blocks"] = None if v["drop_blocks"] is None else tuple(str(n) for n in v["drop_blocks"])
        pairs = _tuple(v["group_ratio"], "group_ratio")
        v["group_ratio"] = None if pairs is None else tuple((str(p), float(r)) for p, r in pairs)
        object.__setattr__(self, "_values", v)
        self._check()

    def __getattr__(self, name):
        try:
            return object.__getattribute__(self, "_values")[name]
        except KeyError:
            raise AttributeError(f"KeepRules has no rule {name!r}") from None

    def __setattr__(self, name, value):
        raise AttributeError("KeepRules is frozen: make another one (KeepRules.replace)")

    def __eq__(self, other):
        return isinstance(other, KeepRules) and self._values == other._values

    def __hash__(self):
        return hash(tuple(self._values.items()))

    def __repr__(self):
        return f"KeepRules({', '.join(f'{k}={v!r}' for k, v in self.given().items())})"

    def __reduce__(self):  # pickled (submitit jobs) as the rules given
        return _keep_rules, (self.given(),)

    def given(self):
        """name -> value of the rules set (not at their defaults)."""
        return {k: v for k, v in self._values.items() if v != SETTINGS.get(k)}

    def values(self):
        """name -> value of every rule (a copy)."""
        return dict(self._values)

    def replace(self, **changes):
        return KeepRules(**{**self._values, **changes})

    def given_budgets(self):
        """[(Budget, value)] of the budgets set."""
        return [(b, self._values[b.name]) for b in budgets() if self._values.get(b.name) is not None]

    def _check(self):
        for name, allowed in _RANGES.items():
            for value in _values(getattr(self, name)):
                check_value("KeepRules", name, value, allowed)
        for budget, value in self.given_budgets():
            problem = budget.check(value)
            if problem:
                raise FieldError("KeepRules", budget.name, problem)
        if self.hidden_ratio is not None and self.mlp_ratio is not None:
            raise FieldError("KeepRules", "hidden_ratio", "and `mlp_ratio` exclude each other: give one")
        for pattern, share in self.group_ratio or ():
            if Range(0, 1, hi_open=True)(share):
                raise FieldError("KeepRules", "group_ratio", f"{pattern}={share:g}: the share must be in [0, 1)")
        self._check_latency()
        self._check_depth()

    def _check_depth(self):
        if not isinstance(self.prune_depth, bool):
            raise FieldError("KeepRules", "prune_depth", f"must be true or false, got {self.prune_depth!r}")
        given = [k for k in ("depths", "remove_blocks", "drop_blocks", "prune_depth")
                 if self._values[k] not in (None, False)]
        if len(given) > 1:
            raise FieldError("KeepRules", given[0], f"and `{given[1]}` exclude each other: give one depth rule")
        if self.prune_depth and not self.latency_targeted:
            raise FieldError("KeepRules", "prune_depth", "plans depth with a latency target: give `target_latency` "
                             "or `target_speedup` (or fix depth with `depths` / `remove_blocks`)")

    def _check_latency(self):
        if self.target_latency is not None and self.target_speedup is not None:
            raise FieldError("KeepRules", "target_latency", "and `target_speedup` exclude each other: give one")
        given = [f"`{k}`" for k in ("latency_backend", "latency_batch", "latency_dtype") if self._values[k] != SETTINGS[k]]
        if given and not self.latency_targeted:
            raise FieldError("KeepRules", given[0].strip("`"), "applies to `target_latency` / `target_speedup` "
                             f"(given: {', '.join(given)})")
        check_value("KeepRules", "latency_backend", self.latency_backend, Choice(runtime_names()))
        runtime = get_runtime(self.latency_backend)
        if self.latency_dtype == "bf16" and "bf16" not in runtime.amps:
            raise FieldError("KeepRules", "latency_dtype", f"bf16: the {runtime.name} backend runs in {runtime.precisions()}")

    @property
    def latency_targeted(self):
        return self.target_latency is not None or self.target_speedup is not None

    @property
    def targeted(self):
        """Whether a global target ranks the free groups."""
        return self.latency_targeted or bool(self.given_budgets())

    @property
    def prunes_depth(self):
        """Whether a rule removes blocks."""
        return any(v is not None for v in (self.depths, self.remove_blocks, self.drop_blocks)) or self.prune_depth

    @property
    def prunes_width(self):
        """Whether a rule removes channels."""
        return self.targeted or any(v is not None for v in (self.dims, self.hidden_ratio, self.mlp_ratio,
                                                            self.group_ratio))

    @property
    def reads_cost(self):
        """Whether a budget given reads params / MACs (a CostModel is needed)."""
        return any(b.reads_cost for b, _ in self.given_budgets())

    def any(self):
        return self.prunes_width or self.prunes_depth


def _keep_rules(given):
    return KeepRules(**given)


@dataclass(frozen=True, kw_only=True)
class Calibration:
    """Training images for the data-driven criteria (taylor, activation).

    batches x batch_size images of the training split through the evaluation transform, drawn
    with the spec's seed from data_set / data_path (default: the data the checkpoint was
    trained on), or `data`: your own list of (images, labels) batches, used as given.
    """
    batches: int = 8
    batch_size: int = 32
    data_set: str | None = None
    data_path: str | None = None
    data: list | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        for name in ("batches", "batch_size"):
            check_value("Calibration", name, getattr(self, name), Range(1, integer=True), flag=f"--calib_{name}")
        if self.data is not None and (self.data_set or self.data_path):
            raise FieldError("Calibration", "data", "and `data_set` / `data_path` exclude each other: give one")


@dataclass(frozen=True, kw_only=True)
class PruneSpec:
    """One pruning.

    criterion: a registered name or a Criterion.
    rules: KeepRules (at least one rule).
    aggregation: Aggregation; None fields take the criterion's default.
    raw_weights: score stored pwconv2 rows without folding in the layer scale.
    seed: the draws of a seeded criterion / the calibration images (default 0 for those).
    calibration: Calibration for a data-driven criterion (default: Calibration()).
    use_ema: score the checkpoint's model_ema weights.
    model: a registered model the weights must have the shape of.
    input_size: image side for MACs (default: the source's training size, else 224).
    compensate: what is done after the cut (COMPENSATIONS): "none", "stats" or "refit" (fit
        to the dense model on the calibration images, which then apply).
    trace: read the channel groups off a recorded forward (models/graph.py) even where the
        family declares them; any other model is always traced.
    """
    criterion: str | Criterion = "opnorm"
    rules: KeepRules = field(default_factory=KeepRules)
    aggregation: Aggregation = field(default_factory=Aggregation)
    raw_weights: bool = False
    seed: int | None = None
    calibration: Calibration | None = None
    use_ema: bool = False
    model: str | None = None
    input_size: int | None = None
    compensate: str = "none"
    trace: bool = False

    def __post_init__(self):
        for name, types in (("rules", KeepRules), ("aggregation", Aggregation), ("calibration", (Calibration, type(None)))):
            if not isinstance(getattr(self, name), types):
                raise TypeError(f"PruneSpec.{name} must be a {getattr(types, '__name__', 'Calibration or None')}, "
                                f"not {type(getattr(self, name)).__name__}")
        check_value("PruneSpec", "compensate", self.compensate, Choice(tuple(COMPENSATIONS)))
        if not isinstance(self.trace, bool):
            raise TypeError(f"PruneSpec.trace must be a bool, not {type(self.trace).__name__}")
        check_value("PruneSpec", "input_size", self.input_size, Range(1, integer=True))
        check_value("PruneSpec", "seed", self.seed, Range(0, 2 ** 31 - 1, integer=True))

    def resolved(self):
        """The spec with the criterion's defaults filled in (idempotent); UserError for any
        option given that the criterion does not read, and for a spec without a keep rule."""
        crit = get_criterion(self.criterion)
        _check_criterion_rules(crit, self.rules)
        applies = crit.options()
        if not self.rules.prunes_width:  # blocks alone: nothing reads the channel aggregation
            applies -= {"scope", "normalize", "reduce", "raw_weights"}
        if self.compensate != "none":  # the compensation reads calibration images the seed draws
            applies |= {"seed", "calibration"}
        scope = self.aggregation.scope  # a criterion's own fixed scope is what it reads anyway
        given = {"scope": scope is not None and scope != crit.aggregation.scope, "raw_weights": self.raw_weights,
                 "seed": self.seed is not None, "calibration": self.calibration is not None,
                 **{k: getattr(self.aggregation, k) not in (None, getattr(crit.aggregation, k))
                    for k in ("normalize", "reduce")}}  # a default (a resolved spec's) reads as not given
        for option, is_given in given.items():
            if is_given and option not in applies:
                raise UserError(f"{_flag(option)} does not apply to criterion {crit.name}: "
                                f"{_why(crit, option, self.rules.prunes_width)}")
        if not self.rules.any():
            names = ["dims", "hidden_ratio", "mlp_ratio", "group_ratio", *(b.name for b in budgets()),
                     "depths", "remove_blocks", "target_latency", "target_speedup"]
            raise UserError(f"no keep rule: give {', '.join('--' + n for n in names[:-1])} or --{names[-1]} "
                            "(without one the output equals the input)")
        return replace(self, criterion=crit, aggregation=self.aggregation.filled(crit.aggregation),
                       seed=(self.seed or 0) if "seed" in applies else None,
                       calibration=(self.calibration or Calibration()) if "calibration" in applies else None)

    def record(self):
        """The settings a resolved spec used, as JSON-able values (checkpoint `pruning.options`)."""
        rules = self.rules.values()
        rules["group_ratio"] = [list(p) for p in self.rules.group_ratio] if self.rules.group_ratio else None
        for key in ("dims", "hidden_ratio", "mlp_ratio", "depths", "drop_blocks"):
            rules[key] = list(rules[key]) if rules[key] is not None else None
        if not self.rules.latency_targeted:  # no latency was measured
            rules.update(latency_backend=None, latency_batch=None, latency_dtype=None)
        out = {"criterion": self.criterion.name, "model": self.model, **rules, **asdict(self.aggregation),
               "raw_weights": self.raw_weights if "raw_weights" in self.criterion.options() else None,
               "use_ema": self.use_ema, "seed": self.seed, "input_size": self.input_size,
               "compensate": self.compensate, "trace": self.trace}
        calib = self.calibration
        out.update(calib_batches=None, calib_batch_size=None, data_set=None)
        if calib is not None:
            own = calib.data is not None
            out.update(calib_batches=len(calib.data) if own else calib.batches,
                       calib_batch_size=None if own else calib.batch_size,
                       data_set="(batches given in Python)" if own else calib.data_set)
        return out


def _check_criterion_rules(crit, rules):
    """A criterion scores channels, blocks or both: refuse rules it cannot serve."""
    if crit.score is None and rules.prunes_width:
        raise UserError(f"criterion {crit.name} scores whole blocks only: use it with --depths, --remove_blocks "
                        "or --drop_blocks and no channel rule")
    if rules.prunes_depth:
        check_block_score(crit)


def _flag(option):
    return {"calibration": "calibration (--calib_batches, --calib_batch_size, --data_set, --data_path)",
            "seed": "--seed", "scope": "--scope", "raw_weights": "--raw_weights", "normalize": "--normalize",
            "reduce": "--reduce"}[option]


def _why(crit, option, width=True):
    if crit.score is None and option in ("normalize", "reduce"):
        return "it scores whole blocks, one number each"
    if not width and option in ("scope", "normalize", "reduce", "raw_weights"):
        return "it combines channel scores, and no rule here removes channels (blocks alone)"
    if option == "scope":
        return f"it reads {crit.reads}, not weight rows (scope {crit.aggregation.scope})"
    if option == "raw_weights":
        return ("its scores do not depend on the weight values" if crit.reads == "weights"
                else f"it reads {crit.reads}, not weight rows")
    if option == "seed":
        return "its scores do not depend on a seed (and --compensate is none)"
    return "it reads no calibration data (and --compensate is none)"

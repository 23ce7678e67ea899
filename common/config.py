"""Typed configuration below the command lines: frozen dataclasses whose fields are named
after the flags that set them, and one declarative way to check their values.

A field declares its allowed values with `ranged(default, Range(...))` (or `choice(default,
options)`); `Config.check()` tests every declared field and raises `FieldError`, which names
the field ("DataConfig.input_size must be >= 1, got 0"). A command line builds a config from
its parsed flags with `Config.from_args(args)` and `common.errors.run_cli` prints a
FieldError as the flag ("--input_size must be >= 1, got 0"): library errors name fields, the
command line maps them to its flags. options (main.py), KeepRules and the budgets, the studies
and the runtimes check their numbers with the same `Range`.
"""
import math
import numbers
import re
from dataclasses import dataclass, field, fields, replace

from common.errors import UserError


class FieldError(UserError):
    """A bad value of a named field. str(): "Owner.field problem"; `for_command_line()` (what
    run_cli prints): "--field problem". Other fields the problem names are written `name` in
    backquotes: plain in the library's message, --name on the command line."""

    def __init__(self, owner, name, problem, flag=None):
        self.owner, self.field, self.problem = owner, name, problem
        self.flag = flag or f"--{name}"  # a field whose flag has another name says which
        text = _FIELD_REF.sub(r"\1", problem)
        super().__init__(f"{owner}.{name} {text}" if owner else f"{name} {text}")

    def for_command_line(self):
        return f"{self.flag} " + _FIELD_REF.sub(r"--\1", self.problem)


_FIELD_REF = re.compile(r"`(\w+)`")


@dataclass(frozen=True)
class Range:
    """Allowed numbers: lo / hi bounds (None: unbounded), each closed unless *_open; integer:
    whole numbers only. Called on a value: None when it is allowed, else what it must be."""
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    integer: bool = False

    def __call__(self, value):
        kind = numbers.Integral if self.integer else numbers.Real
        if isinstance(value, bool) or not isinstance(value, kind):
            noun = "a whole number" if self.integer else "a number"
            return f"must be {noun} {self.text}, got {value!r}"
        if not math.isfinite(value):
            return f"must be {self.text}, got {value}"
        low = self.lo is None or (value > self.lo if self.lo_open else value >= self.lo)
        high = self.hi is None or (value < self.hi if self.hi_open else value <= self.hi)
        return None if low and high else f"must be {self.text}, got {value}"

    @property
    def text(self):
        noun = "a whole number" if self.integer else "a number"
        lo, hi = _number(self.lo), _number(self.hi)
        if self.lo is not None and self.hi is not None:
            return f"in {'(' if self.lo_open else '['}{lo}, {hi}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{'>' if self.lo_open else '>='} {lo}"
        if self.hi is not None:
            return f"{'<' if self.hi_open else '<='} {hi}"
        return noun


def _number(x):
    return str(int(x)) if isinstance(x, (int, float)) and float(x).is_integer() else f"{x}"


@dataclass(frozen=True)
class Choice:
    """Allowed values from a fixed set; called like Range."""
    options: tuple

    def __call__(self, value):
        return None if value in self.options else f"must be one of {', '.join(map(str, self.options))}, got {value!r}"


def ranged(default, check, **kwargs):
    """A dataclass field whose value `check` (a Range or Choice) allows; None always passes."""
    return field(default=default, metadata={"check": check}, **kwargs)


def check_value(owner, name, value, check, flag=None):
    """FieldError when `check` refuses `value` (None is 'not given' and passes)."""
    problem = None if value is None else check(value)
    if problem:
        raise FieldError(owner, name, problem, flag)


class Config:
    """Base of the frozen config dataclasses: built from flags, checked on creation."""

    def __post_init__(self):
        self.check()

    def check(self):
        for f in fields(self):
            if "check" in f.metadata:
                check_value(type(self).__name__, f.name, getattr(self, f.name), f.metadata["check"])

    @classmethod
    def from_args(cls, args, **resolved):
        """The config of a parsed command line: each field from the flag of its name (its
        default when the command has no such flag), then the values the run resolved."""
        given = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
        return cls(**{**given, **resolved})

    def replace(self, **changes):
        return replace(self, **changes)

"""The family contract: what every model family provides (docs/design.md section 5).

A family is one file: an `nn.Module` that also subclasses `Family`, implements every abstract
method below, and is registered with `registry.register_family`, which refuses a class that
leaves one out. tests/test_family_contract.py checks every registered family against it.
"""
import re
from abc import ABC, abstractmethod


class Family(ABC):
    """Rebuilds from an `arch` dict, recognises its own weights, declares its channel groups.

    Class attributes:
        head_key: prefix of the classifier's tensors in this layout ("head", "fc", ...).
        declared: its groups are declared by this file and its models are instances of the
            class (False only for the traced family, which builds other libraries' models).
    """
    head_key = "head"
    declared = True

    @classmethod
    @abstractmethod
    def from_arch(cls, arch, **kwargs):
        """The exact shape `arch` describes (kwargs: drop_path_rate, layer_scale_init_value, ...)."""

    @staticmethod
    @abstractmethod
    def infer_arch(state_dict):
        """The arch of a state dict in this family's key layout, or None when it is not one."""

    @staticmethod
    @abstractmethod
    def channel_groups(arch):
        """The channel groups (models/groups.py) of a shape, each with its stage and role."""

    @staticmethod
    @abstractmethod
    def describe(arch):
        """A one-line summary of a shape."""

    @staticmethod
    @abstractmethod
    def widths(arch):
        """(label, text) rows of the widths pruning changes (prune.py's before/after table)."""

    @staticmethod
    @abstractmethod
    def example_arch():
        """A tiny shape of this family: what the contract test builds, prunes and exports."""

    @abstractmethod
    def fold(self):
        """The inference form in place (normalisation folded into a neighbour); returns self."""

    @classmethod
    def arch_after(cls, arch, state_dict):
        """The arch of a pruned state dict of this shape: its fields read off the tensors, the
        rest carried over."""
        found = cls.infer_arch(state_dict)
        if found is None:
            raise ValueError(f"the pruned weights are not a {cls.__name__} layout")
        return {**arch, **found}

    @staticmethod
    def removable_blocks(arch):
        """The residual blocks depth pruning may remove (models.groups.Block); a stage's block
        with a downsampling shortcut stays. [] when the family has none."""
        return []

    @staticmethod
    def stage_depths(arch):
        """Blocks per stage, removable or not."""
        return list(arch["depths"]) if "depths" in arch else [arch["depth"]]

    @staticmethod
    def named_dims(arch):
        """Budget names of known pruned shapes -> residual widths (e.g. {"3M": [...]})."""
        return {}

    @staticmethod
    def from_foreign(state_dict):
        """A state dict in another layout this family reads (timm's), renamed into its own;
        None when it is not one. Raises UserError for a variant it cannot rebuild."""
        return None

    @staticmethod
    def timm_export(arch, state_dict):
        """(timm architecture name, model_args, state dict in timm's layout) when timm's own
        class builds this shape, else None (the shape then needs this project's factories)."""
        return None

    @staticmethod
    def layer_ids(param_names):
        """Layer-wise LR decay: (name -> layer id, number of layers), ids from 0 (stem) to
        num_layers + 1 (head); None when the names are not this family's layout (every
        parameter then gets the same LR)."""
        return None


def match_layer_ids(param_names, patterns, assign):
    """Layer ids from name patterns, the way timm's group matchers read names.

    Args:
        param_names: parameter names.
        patterns: [(regex, kind)]: the regex's groups are stage / block indices.
        assign: callable({name: (kind, indices) or None}) -> (ids, num_layers), or None.
    """
    compiled = [(re.compile(p), kind) for p, kind in patterns]

    def position(name):
        for pattern, kind in compiled:
            m = pattern.match(name)
            if m:
                return kind, tuple(int(g) for g in m.groups())
        return None

    return assign({n: position(n) for n in param_names})

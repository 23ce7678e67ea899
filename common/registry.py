"""The one shape of every extension point's registry (criteria, budgets, runtimes): a dict
from name to a declared object, added by `register`, which checks the type and refuses a second
object under a taken name unless asked to replace it."""


class Registry(dict):
    """name -> a declared object of `cls` (read it like a dict)."""

    def __init__(self, kind, cls):
        super().__init__()
        self.kind, self.cls = kind, cls

    def register(self, item, replace_existing=False):
        """Add `item` under `item.name`; returns it (a module can register and keep it in one line)."""
        if not isinstance(item, self.cls):
            raise TypeError(f"register_{self.kind} takes a {self.cls.__name__}, not {type(item).__name__}")
        if item.name in self and not replace_existing:
            raise ValueError(f"a {self.kind} named {item.name!r} is registered already")
        self[item.name] = item
        return item

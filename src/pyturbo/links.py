"""`import pyturbo.links`: the same module as `pyturbo.tools.links` (the tools live there; see pyturbo/tools/__init__.py)."""
import sys

from .tools import links as _module

# one module under both names (not a copy): its state and monkeypatching are shared
sys.modules[__name__] = _module

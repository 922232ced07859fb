"""`import pyturbo.synth`: the same module as `pyturbo.tools.synth` (the tools live there; see pyturbo/tools/__init__.py)."""
import sys

from .tools import synth as _module

# one module under both names (not a copy): its state and monkeypatching are shared
sys.modules[__name__] = _module

"""pyturbo: pipelined long-prompt prefill for llama.cpp models split layer-wise over several devices.

    model = pyturbo.Model("model.gguf", rpc_servers=["127.0.0.1:50052", "127.0.0.1:50053"])
    with model.context(n_ctx=8192, n_ubatch=512) as ctx:
        result = ctx.prefill(tokens)        # pipelined where that is safe and faster
        print(result.tokens_per_second, result.path, result.timeline.ascii())
"""
from . import _native, devices

# the library is loaded on first use; how many stream devices each GPU becomes is decided then, by this policy
_native.use_stream_policy(devices.decide_gpu_streams, devices.physical_gpu_count)

from .devices import build_info  # noqa: E402
from .context import Context
from .errors import ContextBusyError, ContextCreateError, ContextDeadError, ModelLoadError, PrefillError, PyturboError, WorkerError
from .generation import Completion, Generation, Piece, TokenLogprob, TokenLogprobs
from .model import Model
from .results import PrefillResult
from .sampling import Sampler, SamplerSettings
from .timeline import Timeline, UbatchRecord

__all__ = [
    "Model", "Context", "PrefillResult", "Timeline", "UbatchRecord", "build_info",
    "PyturboError", "ModelLoadError", "WorkerError", "ContextCreateError", "ContextDeadError", "ContextBusyError", "PrefillError",
    "SamplerSettings", "Sampler", "Generation", "Completion", "Piece", "TokenLogprob", "TokenLogprobs",
]
__version__ = "0.1.0"


def __getattr__(name):
    # the tools (pyturbo.tools) load on first use; pyturbo/synth.py, workers.py and links.py make `import
    # pyturbo.workers` give the same module as `from pyturbo import workers` and `pyturbo.workers` after `import pyturbo`
    if name in ("synth", "workers", "links"):
        import importlib
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'pyturbo' has no attribute {name!r}")

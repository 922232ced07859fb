"""Exceptions raised by pyturbo. Each message names the problem and what to do about it."""


class PyturboError(RuntimeError):
    """Base class of pyturbo's errors."""


class ModelLoadError(PyturboError):
    """The model file is missing, unreadable, not GGUF, or llama.cpp refused it."""


class WorkerError(PyturboError):
    """A llama.cpp RPC worker is unreachable, or died while it was used."""


class ContextCreateError(PyturboError):
    """llama.cpp could not create a context with these parameters (the message carries its reason)."""


class ContextDeadError(PyturboError):
    """A device failed during a call: the context (and its model) can no longer be used; create new ones."""


class PrefillError(PyturboError):
    """llama.cpp could not decode the tokens (the message carries its reason)."""


class ContextBusyError(PyturboError):
    """Another thread is running a call on this context: a context runs one call at a time (use one per thread)."""

"""The C boundary: loads libpyturbo_native (built by CMakeLists.txt) with cffi in ABI mode.

The declarations come from the installed headers themselves (the blocks between their cffi markers, CDEF_HEADERS), so
the binding and the library cannot disagree. Only our own small structs cross the boundary; see pyturbo_api.h for why.
"""
from __future__ import annotations

import json
import logging
import os
from functools import lru_cache
from pathlib import Path

import cffi

LIB_DIR = Path(__file__).parent / "_lib"
log = logging.getLogger("pyturbo.llama")
# quiet by default (no last-resort printing of llama.cpp's warnings); configure logging to see them
logging.getLogger("pyturbo").addHandler(logging.NullHandler())

# ggml_log_level -> logging level
_LEVELS = {1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR, 5: logging.DEBUG}


# The cdef: the cffi blocks of the executor's header (the prefill's result and record structs, status codes) and of the
# C boundary's, in that order.
CDEF_HEADERS = ("llama-turbo.h", "pyturbo_api.h")


def _cdef_source() -> str:
    blocks = []
    for name in CDEF_HEADERS:
        header = (LIB_DIR / name).read_text()
        start = header.index("// cffi-begin") + len("// cffi-begin")
        blocks.append(header[start:header.index("// cffi-end")])
    return "\n".join(blocks)


def _build_config() -> dict:
    """What the build recorded (build_info.json, written by CMakeLists.txt next to the libraries)."""
    return json.loads((LIB_DIR / "build_info.json").read_text())


_gpu_streams: dict = {}  # what the stream policy decided when the library was loaded
# The policy deciding how many stream devices each GPU becomes: (decide_gpu_streams, physical_gpu_count) of
# pyturbo.devices, passed in by the package (pyturbo/__init__.py runs before any of its modules) so that this module
# does not import devices, which imports it
_stream_policy: tuple | None = None


def use_stream_policy(decide, count_gpus) -> None:
    """Set the policy the loader asks, before the library is loaded (it decides once, at the load)."""
    global _stream_policy
    _stream_policy = (decide, count_gpus)


def gpu_streams() -> dict:
    """What the stream policy decided at the load: {"source": why, "streams_per_gpu": n or None}."""
    _load()
    return dict(_gpu_streams)


def build_config() -> dict:
    """What the build recorded (build_info.json, written by CMakeLists.txt next to the libraries)."""
    return _build_config()


@lru_cache(maxsize=None)
def _load():
    decide_gpu_streams, physical_gpu_count = _stream_policy
    cuda_build = str(_build_config().get("cuda")).upper() in ("ON", "TRUE", "1")
    # decided before the CUDA backend starts: ggml-cuda reads its device layout once
    _gpu_streams.update(decide_gpu_streams(dict(os.environ), cuda_build, physical_gpu_count))
    ffi = cffi.FFI()
    ffi.cdef(_cdef_source())
    lib = ffi.dlopen(str(LIB_DIR / "libpyturbo_native.so"))
    if lib.pt_init(_gpu_streams["streams_per_gpu"] or 0) != 0:
        raise RuntimeError(ffi.string(lib.pt_last_error()).decode(errors="replace"))
    if (_gpu_streams["streams_per_gpu"] or 1) > 1:
        logging.getLogger("pyturbo").info("each GPU is %d stream devices (%s)", _gpu_streams["streams_per_gpu"], _gpu_streams["source"])
    return ffi, lib


def ffi():
    return _load()[0]


def lib():
    return _load()[1]


def last_error() -> str:
    return ffi().string(lib().pt_last_error()).decode(errors="replace")


def with_error(fn, *args):
    """(fn(*args), pt_last_error() of this thread): for C calls made on a helper thread, whose error message is
    per thread."""
    value = fn(*args)
    return value, last_error()


def drain_log() -> None:
    """Move llama.cpp's queued log lines into the `pyturbo.llama` logger (quiet unless configured)."""
    f, l = _load()
    buf = f.new("char[]", 4096)
    while True:
        level = l.pt_next_log(buf, len(buf))
        if level < 0:
            return
        log.log(_LEVELS.get(level, logging.INFO), "%s", f.string(buf).decode(errors="replace"))


class NativeHandle:
    """One Python object owns one C pointer and frees it exactly once: on close(), at the end of a `with` block,
    or when collected, also after a failed __init__ (the pointer is then still None)."""

    _ptr = None

    def _free(self, ptr) -> None:
        raise NotImplementedError

    @property
    def closed(self) -> bool:
        return self._ptr is None

    @property
    def handle(self):
        """The C pointer (None once closed), for the C calls of the objects built on this one (a model's contexts
        and samplers)."""
        return self._ptr

    def close(self) -> None:
        if self._ptr is not None:
            ptr, self._ptr = self._ptr, None
            self._free(ptr)
            drain_log()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def build_id() -> str:
    """Changes whenever the native library is rebuilt."""
    return str((LIB_DIR / "libpyturbo_native.so").stat().st_mtime_ns)



"""The C boundary: loads libpyturbo_native (built by CMakeLists.txt) with cffi in ABI mode.

The declarations come from the installed pyturbo_api.h itself (the block between its cffi markers), so the binding
and the library cannot disagree. Only our own small structs cross the boundary; see that header for why.
"""
from __future__ import annotations

import json
import logging
from functools import lru_cache
from pathlib import Path

import cffi

LIB_DIR = Path(__file__).parent / "_lib"
log = logging.getLogger("pyturbo.llama")
# quiet by default (no last-resort printing of llama.cpp's warnings); configure logging to see them
logging.getLogger("pyturbo").addHandler(logging.NullHandler())

# ggml_log_level -> logging level
_LEVELS = {1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR, 5: logging.DEBUG}


def _cdef_source() -> str:
    header = (LIB_DIR / "pyturbo_api.h").read_text()
    start = header.index("// cffi-begin") + len("// cffi-begin")
    return header[start:header.index("// cffi-end")]


@lru_cache(maxsize=None)
def _load():
    ffi = cffi.FFI()
    ffi.cdef(_cdef_source())
    lib = ffi.dlopen(str(LIB_DIR / "libpyturbo_native.so"))
    return ffi, lib


def ffi():
    return _load()[0]


def lib():
    return _load()[1]


def last_error() -> str:
    return ffi().string(lib().pt_last_error()).decode(errors="replace")


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


def build_info() -> dict:
    """How the native part was built: CUDA or not, which llama.cpp tree, and the devices it sees now."""
    info = json.loads((LIB_DIR / "build_info.json").read_text())
    l, f = lib(), ffi()
    info["cuda"] = bool(l.pt_has_cuda())
    info["devices"] = [
        {"name": f.string(l.pt_device_name(i)).decode(), "description": f.string(l.pt_device_description(i)).decode()}
        for i in range(l.pt_device_count())
    ]
    drain_log()
    return info

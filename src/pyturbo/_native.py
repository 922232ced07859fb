"""The C boundary: loads libpyturbo_native (built by CMakeLists.txt) with cffi in ABI mode.

The declarations come from the installed pyturbo_api.h itself (the block between its cffi markers), so the binding
and the library cannot disagree. Only our own small structs cross the boundary; see that header for why.
"""
from __future__ import annotations

import ctypes
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


def _cdef_source() -> str:
    header = (LIB_DIR / "pyturbo_api.h").read_text()
    start = header.index("// cffi-begin") + len("// cffi-begin")
    return header[start:header.index("// cffi-end")]


# One GPU split into this many stream devices when PYTURBO_GPU_STREAMS is "auto" (the default). Measured on an H100
# with an 8B F16 model (bench/results/2026-11-25-h100-cuda.md): llama.cpp's own scheduler over 4 stream devices of
# one GPU overlaps the ubatches of a prompt, 1.00-1.16x the prefill throughput of the GPU as one device (prompts of
# 512-32K tokens). The cost is one compute buffer per stream device.
AUTO_STREAMS_PER_GPU = 4


def _physical_gpu_count() -> int:
    """CUDA GPUs this process can use (CUDA_VISIBLE_DEVICES applies), asked of the driver; 0 when there is none."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


def decide_gpu_streams(env: dict, cuda_build: bool, count_gpus) -> dict:
    """How many devices the CUDA backend will make of each GPU, and why (`count_gpus()` is asked only when needed).
    Only a single GPU is split: GGML_CUDA_DEVICES maps devices to GPUs round-robin, which would interleave the GPUs
    of a multi-GPU machine in the layer order."""
    if "GGML_CUDA_DEVICES" in env:  # the user's own layout wins
        return {"source": f"GGML_CUDA_DEVICES={env['GGML_CUDA_DEVICES']}", "streams_per_gpu": None}
    wanted = env.get("PYTURBO_GPU_STREAMS", "auto").strip().lower() or "auto"
    if wanted != "auto" and not (wanted.isdigit() and int(wanted) >= 1):
        raise ValueError(f"PYTURBO_GPU_STREAMS must be 'auto' or a count >= 1, not {wanted!r}")
    if not cuda_build:
        return {"source": "no CUDA in this build", "streams_per_gpu": 1}
    n_gpus = count_gpus()
    if n_gpus != 1:
        return {"source": f"{n_gpus} GPUs (only a single GPU is split)", "streams_per_gpu": 1}
    streams = AUTO_STREAMS_PER_GPU if wanted == "auto" else int(wanted)
    return {"source": f"PYTURBO_GPU_STREAMS={wanted}", "streams_per_gpu": streams}


def _build_config() -> dict:
    """What the build recorded (build_info.json, written by CMakeLists.txt next to the libraries)."""
    return json.loads((LIB_DIR / "build_info.json").read_text())


def gpu_streams_setting() -> dict:
    """decide_gpu_streams() for this process. Must run before the CUDA backend starts: ggml-cuda reads
    GGML_CUDA_DEVICES once."""
    cuda_build = str(_build_config().get("cuda")).upper() in ("ON", "TRUE", "1")
    return decide_gpu_streams(dict(os.environ), cuda_build, _physical_gpu_count)


_gpu_streams: dict = {}  # what gpu_streams_setting() decided when the library was loaded


@lru_cache(maxsize=None)
def _load():
    _gpu_streams.update(gpu_streams_setting())
    if (_gpu_streams["streams_per_gpu"] or 1) > 1:
        os.environ["GGML_CUDA_DEVICES"] = str(_gpu_streams["streams_per_gpu"])
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
    info = _build_config()
    l, f = lib(), ffi()
    info["cuda"] = bool(l.pt_has_cuda())
    info["gpu_streams"] = dict(_gpu_streams)
    info["devices"] = [
        {"name": f.string(l.pt_device_name(i)).decode(), "description": f.string(l.pt_device_description(i)).decode(),
         "events": l.pt_device_has_events(i) == 1}
        for i in range(l.pt_device_count())
    ]
    drain_log()
    return info

"""Devices: what llama.cpp sees in this process, and the policies that choose among them (pure functions, tested
without a GPU): how many stream devices each GPU becomes, which devices a model is split over by default, and how many
CPU threads a context gets by default."""
from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

from . import _native, settings

# One GPU split into this many stream devices when PYTURBO_GPU_STREAMS is "auto" (the default): llama.cpp's own
# scheduler overlaps the ubatches of a prompt over stream devices of one GPU, and 4 was the best or tied count of those
# measured (bench/results/2026-11-25-h100-q4-streams.md). The cost is one compute buffer per stream device.
AUTO_STREAMS_PER_GPU = 4

# ggml_backend_dev_type
CPU, GPU, IGPU, ACCEL = 0, 1, 2, 3

MAX_THREADS = 512      # GGML_MAX_N_THREADS: ggml's thread pool has room for no more


@dataclass(frozen=True)
class Device:
    name: str           # as llama.cpp names it: "CPU", "CUDA0", "RPC0", ...
    description: str    # for an RPC device: the server's endpoint
    type: int           # ggml_backend_dev_type

    @property
    def is_rpc(self) -> bool:
        return self.name.startswith("RPC")


def usable_cpu_cores() -> int:
    """The CPU cores this process may run on (taskset, cpusets), not the machine's count: threads beyond them only
    compete for the same cores."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):   # not on Linux
        return os.cpu_count() or 1


def list_devices() -> list[Device]:
    """Every device registered in this process, in llama.cpp's order."""
    ffi, lib = _native.ffi(), _native.lib()
    return [Device(ffi.string(lib.pt_device_name(i)).decode(), ffi.string(lib.pt_device_description(i)).decode(),
                   lib.pt_device_type(i)) for i in range(lib.pt_device_count())]


def build_info() -> dict:
    """How the native part was built: CUDA or not, which llama.cpp tree, and the devices it sees now."""
    info = _native.build_config()
    lib = _native.lib()
    info["cuda"] = bool(lib.pt_has_cuda())
    info["gpu_streams"] = _native.gpu_streams()
    info["devices"] = [{"name": d.name, "description": d.description, "events": lib.pt_device_has_events(i) == 1}
                       for i, d in enumerate(list_devices())]
    _native.drain_log()
    return info


def choose_devices(requested: list[str] | None, rpc_devices: list[str], available: list[Device]) -> list[str]:
    """The devices a model is split over: `requested` when given; else the devices of the RPC servers passed to this
    model, in that order; else the local GPUs (none: the CPU alone). RPC servers registered earlier in this process
    stay registered, so llama.cpp's own default (every device) would put their layers into every later model."""
    if requested is None:
        requested = rpc_devices or [d.name for d in available if d.type in (GPU, IGPU) and not d.is_rpc]
    if len(set(requested)) != len(requested):
        raise ValueError(f"devices lists a device twice ({requested}); each device can be one stage only")
    known = {d.name for d in available}
    for name in requested:
        if name not in known:
            raise ValueError(f"no device named {name!r}; available: {', '.join(sorted(known))}")
    return list(requested)


def resolve_input_layer(input_layer: str, devices: list[str], available: list[Device], host_weights: bool) -> str:
    """Where the token embeddings live. "auto": on the first device when every stage is an RPC worker (no weights
    kept in this process's memory, `host_weights`, which make its CPU a stage of every layer anyway), where a
    ubatch's token ids then cross the network to it instead of its embeddings (n_embd x 4 bytes per token: 512 KiB
    per 128-token ubatch at 1024 wide, a link's 84 ms at 50 Mbit/s, on the path of every ubatch); else on the CPU,
    llama.cpp's choice (a lookup is cheap, and a local device's memory is better spent on layers)."""
    if input_layer != "auto":
        return input_layer
    described = {d.name: d for d in available}
    all_rpc = bool(devices) and not host_weights and all(described[name].is_rpc for name in devices)
    return "first-device" if all_rpc else "cpu"


def decide_gpu_streams(env: dict, cuda_build: bool, count_gpus) -> dict:
    """How many devices the CUDA backend will make of each GPU, and why (`count_gpus()` is asked only when needed).
    Only a single GPU is split: GGML_CUDA_DEVICES maps devices to GPUs round-robin, which would interleave the GPUs
    of a multi-GPU machine in the layer order."""
    if settings.is_set("GGML_CUDA_DEVICES", env):  # the user's own layout wins
        return {"source": f"GGML_CUDA_DEVICES={settings.read('GGML_CUDA_DEVICES', env)}", "streams_per_gpu": None}
    wanted = settings.read("PYTURBO_GPU_STREAMS", env)
    if not cuda_build:
        return {"source": "no CUDA in this build", "streams_per_gpu": 1}
    n_gpus = count_gpus()
    if n_gpus != 1:
        return {"source": f"{n_gpus} GPUs (only a single GPU is split)", "streams_per_gpu": 1}
    streams = AUTO_STREAMS_PER_GPU if wanted == "auto" else wanted
    return {"source": f"PYTURBO_GPU_STREAMS={wanted}", "streams_per_gpu": streams}


def physical_gpu_count() -> int:
    """CUDA GPUs this process can use (CUDA_VISIBLE_DEVICES applies), asked of the driver; 0 when there is none."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


# Where every layer is on a GPU or an RPC worker, this process's CPU only looks up the token embeddings, which ggml
# runs as one task; more threads would only poll for work after each graph, taking cores from the threads that hand
# the devices their work (bench/results/2026-11-26-gpu-host-time.md).
EMBEDDINGS_ONLY_THREADS = 4


def default_threads(layer_devices: list[str], host_weights: bool = False) -> int:
    """Threads of the CPU backend when the caller gives none: every usable core where the CPU holds layers or some of
    their weights (Model(host_tensors=)), else a few for the embedding lookup."""
    cores = min(usable_cpu_cores(), MAX_THREADS)  # a bigger host than ggml's thread pool holds: what it takes
    return cores if "CPU" in layer_devices or host_weights else min(EMBEDDINGS_ONLY_THREADS, cores)

"""Memory checked before it is asked for.

llama.cpp allocates a context's KV cache and compute buffers on every device at once, and an RPC worker (or this
process) that asks for more than the machine has is killed by the OOM killer rather than getting an error. So before
a model is loaded or a context created, a plan (a copy of the model loaded with llama.cpp's no_alloc: metadata only)
says what each device would get, and that is compared with the free memory each device reports (a worker asks its
own device; patches/0008 makes a CPU report what Linux says is available).

Devices that draw on the same memory are checked together: this process's host buffers and the CPU workers on
loopback share this host's RAM. Workers on other hosts are checked one by one (two CPU workers on one remote host
would each see all of its memory).
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from . import _native
from .devices import physical_gpu_count

HOST = "CPU"  # the plan's name for host memory (every host buffer type)
# Host bytes per token of n_ctx that llama.cpp keeps besides the KV tensors (per cell: position, shift, sequence
# bits, and the sequence's position index once used; read in src/llama-kv-cells.h of the pin)
CELL_HOST_BYTES = 96
# Use at most this share of what a device reports free: the rest is for everything not planned (this process, the
# workers' own use, the allocator's rounding)
USABLE_SHARE = 0.9
GiB = 1 << 30


def gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


@dataclass
class Pool:
    """Memory that some devices share, and how much of it they would take."""
    label: str
    devices: list[str]
    free: int
    need: int = 0
    parts: list[str] = field(default_factory=list)

    @property
    def usable(self) -> int:
        return int(self.free * USABLE_SHARE)


class Plan(_native.NativeHandle):
    """A model's memory plan (pt_plan): made with pt_model_load's arguments, freed with the model."""

    def __init__(self, path: str, load_args: tuple, endpoints: dict[str, str]):
        ffi, lib = _native.ffi(), _native.lib()
        ptr = lib.pt_plan_new(path.encode(), *load_args)
        _native.drain_log()
        if ptr == ffi.NULL:
            raise ValueError(ffi.string(lib.pt_last_error()).decode(errors="replace"))
        self._ptr = ptr
        self.endpoints = endpoints  # RPC device name -> its worker's endpoint

    def needs(self, n_ctx: int, n_batch: int, n_ubatch: int, flash_attn: int) -> dict[str, dict[str, int]]:
        """{device: {"model": bytes, "context": bytes, "compute": bytes}} for a context with these parameters."""
        ffi, lib = _native.ffi(), _native.lib()
        cap = 64
        out = ffi.new("pt_memory_need[]", cap)
        n = lib.pt_plan_needs(self._ptr, n_ctx, n_batch, n_ubatch, flash_attn, out, cap)
        _native.drain_log()
        if n < 0:
            raise ValueError(ffi.string(lib.pt_last_error()).decode(errors="replace"))
        return {ffi.string(out[i].device).decode(): {"model": out[i].model, "context": out[i].context,
                                                      "compute": out[i].compute} for i in range(min(n, cap))}

    def kv_bytes_per_token(self) -> int:
        return int(_native.lib().pt_plan_kv_bytes_per_token(self._ptr))

    def _free(self, ptr) -> None:
        _native.lib().pt_plan_free(ptr)


def device_memory(device: str) -> tuple[int, int]:
    """(free, total) bytes as the device reports them; (0, 0) if it cannot say."""
    ffi, lib = _native.ffi(), _native.lib()
    free, total = ffi.new("uint64_t *"), ffi.new("uint64_t *")
    if lib.pt_device_memory(device.encode(), free, total) != 0:
        return 0, 0
    return int(free[0]), int(total[0])


def _is_loopback(endpoint: str) -> bool:
    host = endpoint.rpartition(":")[0]
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def pools(devices: list[str], endpoints: dict[str, str]) -> dict[str, Pool]:
    """The memory pool of each device: this host's RAM for HOST and for CPU workers on loopback (they report this
    host's total); the one GPU for its stream devices (_native.decide_gpu_streams, GGML_CUDA_DEVICES); else the
    device's own."""
    host_free, host_total = device_memory(HOST)
    host = Pool("this host's RAM", [HOST], host_free)
    by_device = {HOST: host}
    # several CUDA devices on one physical GPU (stream devices): one memory
    one_gpu = sum(d.startswith("CUDA") for d in devices) > 1 and physical_gpu_count() == 1
    gpu: Pool | None = None
    for dev in devices:
        if dev == HOST:
            continue
        free, total = device_memory(dev)
        ep = endpoints.get(dev, "")
        shared = host if ep and _is_loopback(ep) and total == host_total else None
        if one_gpu and not ep and dev.startswith("CUDA"):
            gpu = shared = gpu or Pool("the GPU (its stream devices)", [], free)
        if shared is not None:
            shared.devices.append(dev)
            shared.free = min(shared.free, free)
            by_device[dev] = shared
        else:
            by_device[dev] = Pool(f"{dev}" + (f" ({ep})" if ep else ""), [dev], free)
    return by_device


def check(needs: dict[str, int], endpoints: dict[str, str], what: str, advice: str,
          detail: dict[str, str] | None = None) -> None:
    """MemoryError naming every pool that cannot hold its devices' needs (bytes), and what to change."""
    by_device = pools(sorted(needs), endpoints)
    for dev, n in needs.items():
        pool = by_device[dev]
        pool.need += n
        if n:
            pool.parts.append(f"{dev} {gib(n)}" + (f" ({detail[dev]})" if detail and dev in detail else ""))
    short = []
    seen = set()
    for pool in by_device.values():
        if id(pool) in seen or pool.free <= 0:  # a device that cannot say what is free is not judged
            continue
        seen.add(id(pool))
        if pool.need > pool.usable:
            short.append(f"{pool.label} needs {gib(pool.need)} ({', '.join(pool.parts)}) but has {gib(pool.free)} "
                         f"free (up to {USABLE_SHARE:.0%} of it is used)")
    if short:
        raise MemoryError(f"{what} does not fit: " + "; ".join(short) + f". {advice}")


def check_context(plan: Plan, n_ctx: int, n_batch: int, n_ubatch: int, flash_attn: int) -> dict[str, dict[str, int]]:
    """Raise MemoryError if a context with these parameters would not fit; return the plan's needs per device."""
    advice = (f"Lower n_ctx (compute buffers grow with n_ctx x n_ubatch, so a smaller n_ubatch helps too), or split "
              f"the model over more devices")
    # a lower bound first: planning a huge n_ctx would itself take host memory in proportion (KV cell bookkeeping)
    per_token = plan.kv_bytes_per_token()
    devices = sorted(set(plan.endpoints) | {HOST})
    total_free = sum(p.free for p in {id(p): p for p in pools(devices, plan.endpoints).values()}.values())
    if n_ctx * (per_token + CELL_HOST_BYTES) > total_free * USABLE_SHARE:
        raise MemoryError(f"n_ctx={n_ctx} does not fit: its KV cache alone needs at least "
                          f"{gib(n_ctx * (per_token + CELL_HOST_BYTES))} ({per_token + CELL_HOST_BYTES} bytes per token), "
                          f"and all devices together have {gib(total_free)} free. {advice}; here n_ctx can be at most "
                          f"about {int(total_free * USABLE_SHARE / (per_token + CELL_HOST_BYTES)):,}")
    needs = plan.needs(n_ctx, n_batch, n_ubatch, flash_attn)
    wanted = {dev: n["context"] + n["compute"] + (n_ctx * CELL_HOST_BYTES if dev == HOST else 0)
              for dev, n in needs.items()}
    detail = {dev: f"KV {gib(n['context'])} + compute {gib(n['compute'])}" for dev, n in needs.items()}
    check(wanted, plan.endpoints, f"a context with n_ctx={n_ctx}, n_ubatch={n_ubatch}", advice + ".", detail)
    return needs


def check_model(plan: Plan, use_mmap: bool) -> None:
    """Raise MemoryError if the model's weights would not fit on its devices (host weights that are memory-mapped
    are the page cache's, not counted)."""
    needs = plan.needs(256, 32, 32, -1)
    wanted = {dev: n["model"] for dev, n in needs.items() if dev != HOST or not use_mmap}
    check(wanted, plan.endpoints, "the model's weights",
          "Split the model over more devices, or use a smaller (more quantized) model file.")


def pipeline_refusal(needs: dict[str, dict[str, int]], endpoints: dict[str, str], n_in_flight: int) -> str:
    """Why the pipeline's compute buffers (one set per ubatch in flight, on every device) would not fit in the memory
    free now, or ""."""
    wanted = {dev: n["compute"] * n_in_flight for dev, n in needs.items()}
    try:
        check(wanted, endpoints, f"the pipeline's {n_in_flight} ubatches in flight",
              "Lower max_in_flight or n_ubatch to pipeline.")
    except MemoryError as e:
        return str(e)
    return ""

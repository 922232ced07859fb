"""`Model`: one GGUF model loaded by llama.cpp, possibly split layer-wise over devices or RPC workers."""
from __future__ import annotations

import logging
import os
import re
import socket
import threading
import weakref
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from . import _calls, _memory, _native, balance, policy
from .devices import GPU, IGPU, Device, choose_devices, list_devices, resolve_input_layer
from .errors import ContextDeadError, ModelLoadError, WorkerError
from .rpc_auth import resolve_rpc_token

SPLIT_MODES = {"none": 0, "layer": 1, "row": 2}

log = logging.getLogger("pyturbo")

# How long one RPC worker may take to answer (seconds): a graph computation of one ubatch on one stage, or a transfer,
# must finish within it. Generous for a slow CPU stage; a worker that is stopped or hung is declared dead after it.
DEFAULT_RPC_TIMEOUT = 300.0
# Connecting and the handshake take milliseconds on a live worker: a silent one fails after this (or rpc_timeout, if
# smaller)
RPC_CONNECT_TIMEOUT = 10.0
INPUT_LAYERS = ("auto", "cpu", "first-device")
# The weights `experts_in_host_memory=True` keeps in host memory: every routed expert's matrices and biases (llama.cpp's
# `--cpu-moe`, i.e. `--override-tensor '\.ffn_(up|down|gate)_exps=CPU'`, plus the fused gate_up form of the pin's
# llama-arch.cpp). The router (ffn_gate_inp), shared experts (_shexp) and attention stay on the layer's device.
EXPERT_TENSORS = r"\.ffn_(up|down|gate|gate_up)_exps"


def parse_endpoints(rpc_servers: str | Iterable[str] | None) -> list[str]:
    """'h:p,h:p' or a list of 'h:p' -> validated list."""
    if rpc_servers is None:
        return []
    items = rpc_servers.split(",") if isinstance(rpc_servers, str) else list(rpc_servers)
    endpoints = []
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"RPC server {item!r} must be a 'host:port' string, not {type(item).__name__}")
        item = item.strip()
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"RPC server {item!r} is not of the form host:port")
        if item in endpoints:
            # llama.cpp would register it once: one stage where two were meant
            raise ValueError(f"RPC server {item} is listed twice; each worker can be one stage only (start another "
                             f"worker for another stage)")
        endpoints.append(item)
    return endpoints


def even_layer_split(n_layer: int, n_devices: int) -> list[float]:
    """tensor_split proportions that give each device n_layer/n_devices repeating layers (±1)."""
    if n_devices < 1 or n_layer < n_devices:
        raise ValueError(f"cannot split {n_layer} layers evenly over {n_devices} devices")
    ends = [round((d + 1) * n_layer / n_devices) for d in range(n_devices)]
    return layer_split([e - p for e, p in zip(ends, [0] + ends[:-1])])


def layer_split(layers: Sequence[int]) -> list[float]:
    """tensor_split proportions that put exactly layers[d] repeating layers on device d.

    llama.cpp splits n_layer+1 slots (the output layer is the last) by cumulative proportion, so proportions equal
    to the layer counts would put one layer more on the first devices. Each boundary here falls half a slot before the
    wanted layer boundary, which makes the split exact. A balanced split matters for any pipeline: the slowest stage
    sets the pace (balance.balance_layers proposes counts from measured stage times).
    """
    if not layers or min(layers) < 1:
        raise ValueError(f"every device needs at least one layer, not {list(layers)}")
    n_layer = sum(layers)
    ends = list(np.cumsum(layers))
    cumulative = [(end - 0.5) / (n_layer + 1) for end in ends[:-1]] + [1.0]
    return [c - p for c, p in zip(cumulative, [0.0] + cumulative[:-1])]


def layers_from_split(tensor_split: Sequence[float], n_layer: int) -> list[int]:
    """Repeating layers per device for tensor_split proportions, by llama.cpp's rule: slot i of n_layer+1 (the output
    layer is the last) goes to the first device whose cumulative share exceeds i/(n_layer+1)."""
    cumulative = np.cumsum(tensor_split) / sum(tensor_split)
    owners = [int(np.searchsorted(cumulative, i / (n_layer + 1), side="right")) for i in range(n_layer)]
    return [owners.count(d) for d in range(len(tensor_split))]


def check_host_tensors(host_tensors: str | None, experts_in_host_memory: bool = False) -> str | None:
    """The pattern of weights kept in host memory (Model's host_tensors / experts_in_host_memory), or None; ValueError
    naming the option for a bad one. llama.cpp searches each weight's name ("blk.3.ffn_up_exps.weight") with it
    (std::regex, ECMAScript), as `--override-tensor PATTERN=CPU`."""
    if not isinstance(experts_in_host_memory, bool):
        raise ValueError(f"experts_in_host_memory must be True or False, not {experts_in_host_memory!r}")
    if experts_in_host_memory:
        if host_tensors is not None:
            raise ValueError("give host_tensors or experts_in_host_memory=True, not both (experts_in_host_memory is "
                             f"host_tensors={EXPERT_TENSORS!r})")
        return EXPERT_TENSORS
    if host_tensors is None:
        return None
    if not isinstance(host_tensors, str):
        raise ValueError(f"host_tensors must be a regular expression (str) or None, not {type(host_tensors).__name__}")
    if not host_tensors or "\0" in host_tensors:
        raise ValueError(f"host_tensors must be a non-empty regular expression without NUL characters, not "
                         f"{host_tensors!r} (None keeps every weight on its layer's device)")
    try:
        re.compile(host_tensors)
    except re.error as e:
        raise ValueError(f"host_tensors {host_tensors!r} is not a regular expression: {e}") from None
    return host_tensors


def stage_layers(stages: list[str], devices: list[str], tensor_split: Sequence[float] | None, n_gpu_layers: int,
                 n_layer: int) -> list[int] | None:
    """Repeating layers per stage where the split is known (tensor_split over `devices`, every layer offloaded); a
    stage that is none of those devices holds no whole layer (the CPU, when it keeps some weights: host_tensors)."""
    if not tensor_split or n_gpu_layers >= 0 or len(tensor_split) != len(devices):
        return None
    counts = dict(zip(devices, layers_from_split(tensor_split, n_layer)))
    return [counts.get(name, 0) for name in stages]


def model_identity(path: Path) -> str:
    """This model file as loaded by this build: measurements of another file or build do not apply."""
    stat = path.stat()
    return f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{_native.build_id()}"


def stage_kind(name: str, described: dict[str, Device]) -> tuple[str, str]:
    """(device kind, RPC host or "") of a device: a stage as measurements are keyed (ports change, hosts do not)."""
    dev = described.get(name)
    return name.rstrip("0123456789"), dev.description.rpartition(":")[0] if dev is not None and dev.is_rpc else ""


def check_reachable(endpoint: str, timeout: float = 3.0) -> None:
    """Fail with a clear message before llama.cpp tries to connect (it would abort the process in stock builds)."""
    host, _, port = endpoint.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as e:
        raise WorkerError(
            f"cannot reach the llama.cpp RPC worker at {endpoint} ({e.strerror or e}); start one with "
            f"`python -m pyturbo.worker --port {port}` on that host, or fix the address") from None


def gguf_block_count(path: Path) -> int:
    """The model's layer count, read from the GGUF header without loading it."""
    from gguf import GGUFReader
    try:
        reader = GGUFReader(path)
        for name, field in reader.fields.items():
            if name.endswith(".block_count"):
                return int(field.parts[field.data[0]][0])
    except Exception as e:  # the reader fails in many ways on a damaged file
        raise ModelLoadError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e}); the file is damaged or "
                             f"truncated: download or convert it again") from None
    raise ModelLoadError(f"{path} has no block_count in its metadata")


def resolve_use_mmap(use_mmap: bool | None, host_tensors: str | None, available: Sequence[Device]) -> bool:
    """Model's use_mmap: as given; None maps the file unless weights stay in host memory (host_tensors) and a local
    GPU is there. llama.cpp then puts them in the GPU's pinned host memory (pt_model_params asks for it), but with the
    file mapped it keeps them in the mapping instead (llama_model_loader: "avoid using a host buffer when using mmap"),
    and the GPU copies them for every ubatch from pageable memory, several times slower."""
    if use_mmap is not None:
        if not isinstance(use_mmap, bool):
            raise ValueError(f"use_mmap must be True, False or None, not {use_mmap!r}")
        return use_mmap
    return not (host_tensors and any(d.type in (GPU, IGPU) and not d.is_rpc for d in available))


def check_gguf(path: Path) -> None:
    if not path.exists():
        raise ModelLoadError(f"model file not found: {path} (check the path)")
    if not path.is_file():
        raise ModelLoadError(f"model path is not a file: {path}")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ModelLoadError(f"cannot read the model file {path}: {e.strerror} (check its permissions)") from None
    if magic != b"GGUF":
        raise ModelLoadError(f"{path} is not a GGUF file (it starts with {magic!r}); convert the model to GGUF first")


class Model(_native.NativeHandle):
    """A GGUF model loaded by llama.cpp.

    Parameter names follow llama-cpp-python's `Llama(...)`. `rpc_servers` ('host:port' list or comma string) adds
    llama.cpp RPC workers as devices; unless `devices` says otherwise, the model is then split over exactly those
    workers, in the given order. `devices` names devices to split over ('CUDA0', 'RPC0', 'CPU', ...).
    `tensor_split`: proportions per device, "even" (as many layers on each device), or "auto": layers balanced from
    measured stage times, so that no stage holds the pipeline back (measured once per machine, model and devices, on
    a temporary even split, and stored; `split_choice` says what was chosen and from which numbers; pyturbo.balance).

    `rpc_timeout` (seconds, default DEFAULT_RPC_TIMEOUT; None waits forever) is how long a worker may take to answer:
    one stage's computation of one ubatch, or one transfer. A worker that does not answer in time (stopped, hung) is
    declared dead: the call raises ContextDeadError naming it. Connecting and the handshake get
    min(RPC_CONNECT_TIMEOUT, rpc_timeout). Models sharing a worker share its connection, and so its timeout.
    `rpc_token` is the workers' shared secret (default $PYTURBO_RPC_TOKEN; "" for none): proven to each worker without
    sending it, and a worker that does not prove it in return is refused (WorkerError).
    `input_layer`: where the token embeddings live: "cpu" (llama.cpp's choice: a lookup is cheap and the table stays
    off the devices) or "first-device", with the first layer (patches/0012): when that device is an RPC worker on
    another host, a ubatch's token ids cross the network instead of its embeddings (n_ubatch x n_embd x 4 bytes).
    "auto" (default): "first-device" when every device is an RPC worker, else "cpu" (see `resolve_input_layer`).
    `host_tensors`: a regular expression; the weights whose names it matches stay in host memory and run on this
    process's CPU, the rest of their layer on its device (llama.cpp's `--override-tensor PATTERN=CPU`; a bad pattern
    is a ValueError). `experts_in_host_memory=True` is host_tensors=EXPERT_TENSORS, the routed experts of a
    mixture-of-experts model (llama.cpp's `--cpu-moe`): attention on the devices, the experts in RAM.
    `use_mmap`: map the file instead of reading it (llama.cpp's default). None (default): mapped, except with
    host_tensors on a machine with a GPU: there the host weights go into the GPU's pinned host memory, which llama.cpp
    does only without the mapping (with it, they stay in the mapped file, pageable memory, and every ubatch copies them
    to the GPU at the pageable rate: 6.5-8 GB/s against 55 GB/s pinned on an H200 host,
    bench/results/2026-12-04-gpt-oss-host-copies.md). `self.use_mmap` says what was chosen.
    Before the weights are loaded, they are checked against each device's free memory (MemoryError if they cannot
    fit), and so is every context (see `Context`).
    """

    _eog_tokens: tuple[int, ...] | None = None     # eog_tokens, once listed
    _chat_template = None                          # chat_template, once compiled

    def __init__(self, path: str | os.PathLike, *, n_gpu_layers: int | str = "all", split_mode: str = "layer",
                 main_gpu: int = 0, tensor_split: Sequence[float] | str | None = None, devices: Sequence[str] | None = None,
                 rpc_servers: str | Iterable[str] | None = None, use_mmap: bool | None = None,
                 rpc_timeout: float | None = DEFAULT_RPC_TIMEOUT, rpc_token: str | None = None,
                 input_layer: str = "auto", host_tensors: str | None = None, experts_in_host_memory: bool = False):
        self.contexts: weakref.WeakSet = weakref.WeakSet()   # open contexts, closed first by close()
        self._lock = threading.RLock()       # C calls on the model pointer, and freeing it
        self._holds: set[int] = set()        # contexts whose freeing waits for an abandoned call: free the model after
        self._orphan = None                  # the pointer of a closed model that waits for those
        self.memory_plan: _memory.Plan | None = None
        self._dead: str | None = None
        self.rpc_servers: list[str] = []
        self.path = Path(path)
        check_gguf(self.path)
        if input_layer not in INPUT_LAYERS:
            raise ValueError(f"input_layer must be one of {INPUT_LAYERS}, not {input_layer!r}")
        #: the pattern of weights kept in host memory (host_tensors, or EXPERT_TENSORS), or None
        self.host_tensors = check_host_tensors(host_tensors, experts_in_host_memory)
        if split_mode not in SPLIT_MODES:
            raise ValueError(f"split_mode must be one of {sorted(SPLIT_MODES)}, not {split_mode!r}")
        if n_gpu_layers == "all":
            n_gpu_layers = -1
        if not isinstance(n_gpu_layers, int):
            raise ValueError(f"n_gpu_layers must be an int or 'all', not {n_gpu_layers!r}")
        if tensor_split is not None and not isinstance(tensor_split, str):
            tensor_split = [float(x) for x in tensor_split]
            if not tensor_split or any(x < 0 for x in tensor_split) or sum(tensor_split) <= 0:
                raise ValueError(f"tensor_split must be non-negative proportions with a positive sum, not {tensor_split}")
        if rpc_timeout is not None and (isinstance(rpc_timeout, bool) or not isinstance(rpc_timeout, (int, float))
                                        or not rpc_timeout > 0):
            raise ValueError(f"rpc_timeout must be a number of seconds > 0 (or None: wait forever), not {rpc_timeout!r}")
        self.rpc_timeout = rpc_timeout

        ffi, lib = _native.ffi(), _native.lib()
        endpoints = parse_endpoints(rpc_servers)
        if endpoints:
            lib.pt_rpc_set_secret(resolve_rpc_token(rpc_token).encode())
        rpc_devices = [dev for ep in endpoints for dev in self._connect(ep, rpc_timeout)]
        self.rpc_servers = endpoints
        available = list_devices()
        devices = choose_devices(None if devices is None else list(devices), rpc_devices, available)
        #: whether the file is memory-mapped (see use_mmap)
        self.use_mmap = use_mmap = resolve_use_mmap(use_mmap, self.host_tensors, available)
        #: where the token embeddings live: "cpu" or "first-device" ("auto" resolved)
        self.input_layer = resolve_input_layer(input_layer, devices, available, bool(self.host_tensors))
        #: how the layers were split over the devices, and why (tensor_split="auto" says what it measured)
        self.split_choice = "as given" if tensor_split is not None else "llama.cpp's default"
        if isinstance(tensor_split, str):
            if tensor_split not in ("even", "auto"):
                raise ValueError(f"tensor_split must be proportions, 'even' or 'auto', not {tensor_split!r}")
            if len(devices) < 2:
                raise ValueError(f"tensor_split={tensor_split!r} needs at least two devices (devices= or rpc_servers=)")
            if tensor_split == "auto":
                tensor_split = self._auto_split(devices, available, n_gpu_layers, split_mode, use_mmap)
            else:
                tensor_split, self.split_choice = even_layer_split(gguf_block_count(self.path), len(devices)), "even"

        c_devices = [ffi.new("char[]", d.encode()) for d in devices]
        c_dev_array = ffi.new("const char *[]", c_devices or 1)
        c_split = ffi.new("float[]", tensor_split) if tensor_split else ffi.NULL
        c_host = ffi.new("char[]", self.host_tensors.encode()) if self.host_tensors else ffi.NULL
        load_args = (n_gpu_layers, SPLIT_MODES[split_mode], main_gpu, c_split, len(tensor_split or []), c_dev_array,
                     len(c_devices), int(self.input_layer == "first-device"), c_host)
        self._plan_memory(load_args, use_mmap)
        ptr, error = _calls.run_or_undo(
            lambda: _native.with_error(lib.pt_model_load, str(self.path).encode(), *load_args, int(use_mmap)),
            undo=lambda r: lib.pt_model_free(r[0]),
            disconnect=lambda: self.disconnect_workers("loading was interrupted"))
        _native.drain_log()
        if ptr == ffi.NULL:
            broken = self._broken_worker()
            if broken:
                raise WorkerError(f"{broken}: loading failed: {error}")
            raise ModelLoadError(error)
        self._ptr = ptr
        info = ffi.new("pt_model_info *")
        lib.pt_model_get_info(ptr, info)
        self.n_layer, self.n_vocab, self.n_embd = info.n_layer, info.n_vocab, info.n_embd
        self.n_ctx_train, self.has_vocab = info.n_ctx_train, bool(info.has_vocab)
        names = ffi.new("const char *[]", max(info.n_stages, 1))
        lib.pt_model_stage_names(ptr, names, info.n_stages)
        #: the devices holding the model's layers, in chain order (the pipeline's stages); with host_tensors, the CPU
        #: (which holds some of the layers' weights) follows the first layer's device
        self.devices = [ffi.string(names[i]).decode() for i in range(info.n_stages)]
        described = {d.name: d for d in available}
        #: (device kind, RPC host or "") per stage: the layout as measurements are keyed (policy.calibration_key)
        self.stage_kinds = [stage_kind(name, described) for name in self.devices]
        #: repeating layers per stage, where the split is known (tensor_split given and the layers all offloaded); 0 for
        #: a stage that holds only some of the layers' weights (the CPU with host_tensors)
        self.layers_per_stage = stage_layers(self.devices, devices, tensor_split, n_gpu_layers, self.n_layer)
        #: this model file as loaded by this build (measurements of another file or build do not apply)
        self.identity = model_identity(self.path) + self._placement_tag()

    def _placement_tag(self) -> str:
        """What besides the file changes where the work runs (the input layer, host weights): part of the keys of
        measurements (identity, the stored balance)."""
        return (("" if self.input_layer == "cpu" else f"|input:{self.input_layer}")
                + (f"|host:{self.host_tensors}" if self.host_tensors else ""))

    def _auto_split(self, devices: list[str], available: list[Device], n_gpu_layers: int, split_mode: str,
                    use_mmap: bool) -> list[float]:
        """tensor_split="auto": the balance stored for this model and these devices, or else one measured now on an
        even split (a second, temporary load of the model; once per machine) and stored (pyturbo.balance)."""
        if n_gpu_layers != -1 or split_mode != "layer":
            raise ValueError("tensor_split='auto' balances a layer split with every layer on the devices: use "
                             "n_gpu_layers='all' and split_mode='layer' (or give the proportions yourself)")
        if self.host_tensors:
            raise ValueError("tensor_split='auto' does not balance layers around weights kept in host memory (the CPU "
                             "is then a stage of every layer): give the proportions, or tensor_split='even'")
        described = {d.name: d for d in available}
        layout = [f"{kind}@{host}" if host else f"{kind}:{described[name].description}"
                  for name, (kind, host) in ((name, stage_kind(name, described)) for name in devices)]
        key = balance.balance_key(model_identity(self.path) + self._placement_tag(), layout)
        n_layer = gguf_block_count(self.path)
        stored = policy.calibration().stored_split(key)
        if stored is not None:
            chosen = balance.Balance.from_json(stored)
            if len(chosen.layers) == len(devices) and sum(chosen.layers) == n_layer:
                self.split_choice = f"stored: {chosen.describe()}"
                return layer_split(chosen.layers)
        even = even_layer_split(n_layer, len(devices))
        on_gpu = any(described[name].type in (GPU, IGPU) and not described[name].is_rpc for name in devices)
        log.warning("pyturbo: tensor_split='auto': timing the stages of %s over %s on an even split, once (the "
                    "balance is stored for later loads)", self.path.name, ", ".join(devices))
        try:
            with Model(self.path, devices=devices, tensor_split=even, use_mmap=use_mmap,
                       rpc_timeout=self.rpc_timeout, input_layer=self.input_layer,
                       host_tensors=self.host_tensors) as probe:
                n_tokens, n_ubatch = balance.measuring_shape(probe, on_gpu)
                seconds = balance.measure_stage_seconds(probe, n_tokens, n_ubatch)
                chosen = balance.propose(probe.layers_per_stage, seconds, n_tokens, n_ubatch)
        except balance.NotMeasurable as e:
            self.split_choice = f"even ({e})"
            log.warning("pyturbo: tensor_split='auto': %s; the layers are split evenly", e)
            return even
        policy.calibration().store_split(key, chosen.to_json())
        self.split_choice = f"measured: {chosen.describe()}"
        log.warning("pyturbo: tensor_split='auto': %s", chosen.describe())
        return layer_split(chosen.layers)

    def _connect(self, endpoint: str, rpc_timeout: float | None) -> list[str]:
        """Register a worker's devices (their names), with this model's timeouts."""
        lib = _native.lib()
        check_reachable(endpoint)
        io_s = rpc_timeout or 0.0
        lib.pt_rpc_set_timeouts(endpoint.encode(), min(RPC_CONNECT_TIMEOUT, io_s or RPC_CONNECT_TIMEOUT), io_s)
        n, error = _calls.run_or_undo(lambda: _native.with_error(lib.pt_rpc_add_server, endpoint.encode()),
                                      undo=lambda _: None, disconnect=lambda: lib.pt_rpc_disconnect(endpoint.encode()))
        _native.drain_log()
        if n < 0:
            raise WorkerError(error)
        return [d.name for d in list_devices() if d.is_rpc and d.description == endpoint]

    def _plan_memory(self, load_args: tuple, use_mmap: bool) -> None:
        """The memory plan (kept for contexts), and MemoryError if the weights cannot fit. Without a plan (llama.cpp
        cannot make one of this file) the load itself says what is wrong."""
        rpc = {d.name: d.description for d in list_devices() if d.is_rpc}

        def plan():  # asks the workers: on a helper thread, like every wait
            try:
                p = _memory.Plan(str(self.path), load_args, rpc)
            except ValueError as e:
                if self.host_tensors and str(e).startswith("host_tensors "):
                    raise  # a pattern llama.cpp's std::regex rejects (Python's re took it)
                return None
            try:
                _memory.check_model(p, use_mmap)
            except BaseException:
                p.close()
                raise
            return p

        self.memory_plan = _calls.run_or_undo(plan, undo=lambda p: p.close(),
                                              disconnect=lambda: self.disconnect_workers("loading was interrupted"))

    # ---- failures (check_*, disconnect_workers and the context holds below are public for the model's contexts,
    # which must not reach into it; applications need none of them) -------------------------------------------------

    def _broken_worker(self) -> str | None:
        """Why the model cannot be used any more (a worker's connection is broken), or None."""
        lib = _native.lib()
        for ep in self.rpc_servers:
            if self._dead is None and lib.pt_rpc_connection_state(ep.encode()) < 0:
                self._dead = (f"the connection to the RPC worker at {ep} is broken (the worker died or was restarted, "
                              f"did not answer within rpc_timeout, or was disconnected after an interrupt)")
        return self._dead

    def check_workers(self) -> None:
        """ContextDeadError if the connection to one of the model's workers is broken: the model is unusable."""
        if self._broken_worker() is not None:
            raise ContextDeadError(f"{self._dead}: this model and its contexts cannot be used any more; create a new "
                                   f"Model on live workers")

    def check_usable(self) -> None:
        if self._ptr is None:
            raise ValueError("the model is closed")
        self.check_workers()

    def disconnect_workers(self, why: str) -> None:
        """Close the connections to this model's workers (from any thread): whatever waits on them fails at once."""
        if self._dead is None:
            self._dead = f"its workers were disconnected: {why} while a device was busy"
        for ep in self.rpc_servers:
            _native.lib().pt_rpc_disconnect(ep.encode())

    # ---- tokens ---------------------------------------------------------------------------------------------------

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """Token ids of text; add_special adds BOS (and EOS) as the model's vocabulary asks; parse_special reads
        special-token text such as "<s>" as that token (chat templates need it)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, not {type(text).__name__}")
        ffi, lib = _native.ffi(), _native.lib()
        with self._lock:  # close() from another thread waits
            ptr = self._live_with_vocab()
            data = text.encode()
            cap = len(data) + 8
            buf = ffi.new("int32_t[]", cap)
            n = lib.pt_tokenize_special(ptr, data, len(data), buf, cap, int(add_special), int(parse_special))
            if n < 0:  # -n: the capacity needed
                cap = -n
                buf = ffi.new("int32_t[]", cap)
                n = lib.pt_tokenize_special(ptr, data, len(data), buf, cap, int(add_special), int(parse_special))
        return list(buf[0:n])

    def token_bytes(self, token: int) -> bytes:
        """The bytes one token stands for (a piece of a UTF-8 character for some tokens)."""
        ffi, lib = _native.ffi(), _native.lib()
        buf = ffi.new("char[]", 256)
        with self._lock:
            n = lib.pt_token_to_piece(self._live_with_vocab(), int(token), buf, 256)
        return ffi.buffer(buf, max(n, 0))[:]

    def detokenize(self, tokens: Sequence[int]) -> str:
        """Text of token ids (invalid UTF-8 replaced)."""
        return b"".join(self.token_bytes(t) for t in self.check_tokens(tokens, allow_empty=True)).decode(errors="replace")

    def check_tokens(self, tokens, allow_empty: bool = False) -> np.ndarray:
        """tokens as a contiguous int32 array, or ValueError saying what is wrong with them."""
        arr = np.asarray(tokens)
        if arr.ndim != 1:
            raise ValueError(f"tokens must be a 1-D sequence of ints (or text), got shape {arr.shape}")
        if arr.size == 0:
            if allow_empty:
                return np.zeros(0, dtype=np.int32)
            raise ValueError("tokens is empty: pass at least one token id")
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"tokens must be integers, got dtype {arr.dtype}")
        bad = np.flatnonzero((arr < 0) | (arr >= self.n_vocab))
        if bad.size:
            raise ValueError(f"token id {int(arr[bad[0]])} at index {int(bad[0])} is outside the vocabulary "
                             f"[0, {self.n_vocab}) ({bad.size} such ids)")
        return np.ascontiguousarray(arr, dtype=np.int32)

    def _live_with_vocab(self):
        if self._ptr is None:
            raise ValueError("the model is closed")
        if not self.has_vocab:
            raise ValueError(f"{self.path.name} has no tokenizer vocabulary; pass token ids instead of text")
        return self._ptr

    # ---- special tokens and chat template (src/capi/pt_vocab.cpp) -------------------------------------------------

    def is_eog(self, token: int) -> bool:
        """Whether token ends a generation (EOS, EOT and the like, as the vocabulary marks them)."""
        return _native.lib().pt_token_is_eog(self._live_with_vocab(), int(token)) == 1

    @property
    def bos_id(self) -> int | None:
        tok = _native.lib().pt_token_bos(self._live_with_vocab())
        return tok if tok >= 0 else None

    @property
    def eos_id(self) -> int | None:
        tok = _native.lib().pt_token_eos(self._live_with_vocab())
        return tok if tok >= 0 else None

    def token_text(self, token: int) -> str:
        """A token's text as the vocabulary stores it ("<s>" for a BOS that token_bytes() renders as nothing)."""
        return self._sized_string(lambda buf, cap: _native.lib().pt_token_text(self._live_with_vocab(), int(token), buf, cap))

    @property
    def eog_tokens(self) -> tuple[int, ...]:
        """Every end-of-generation token id (what ignore_eos keeps from being drawn); listed once per model."""
        if self._eog_tokens is None:
            self._eog_tokens = tuple(t for t in range(self.n_vocab) if self.is_eog(t))
        return self._eog_tokens

    @property
    def gguf_chat_template(self) -> str | None:
        """The GGUF's tokenizer.chat_template (Jinja2 source), or None when it has none."""
        text = self._sized_string(lambda buf, cap: _native.lib().pt_model_chat_template(self._live_with_vocab(), buf, cap))
        return text or None

    @property
    def chat_template(self) -> "ChatTemplate":
        """The model's chat template, compiled (`pyturbo.chat.ChatTemplate`): the GGUF's tokenizer.chat_template, or
        ChatML when it has none (as llama-server falls back). Needs Jinja2 (pip install ".[server]")."""
        if self._chat_template is None:
            from .chat import ChatTemplate
            self._chat_template = ChatTemplate.for_model(self)
        return self._chat_template

    @staticmethod
    def _sized_string(call) -> str:
        """A string from a C function that returns its length and copies it only when it fits."""
        ffi = _native.ffi()
        cap = 256
        for _ in range(2):
            buf = ffi.new("char[]", cap)
            n = call(buf, cap)
            if n < 0:
                raise ValueError(_native.last_error())
            if n <= cap:
                return ffi.buffer(buf, n)[:].decode(errors="replace")
            cap = n
        raise RuntimeError("the string changed size between two calls")

    def rpc_traffic(self) -> dict[str, tuple[int, int]]:
        """Bytes this process has sent to each RPC worker and received from it so far, {endpoint: (sent, received)}:
        what crossed this process's link (connections are shared by the models of a process)."""
        ffi, lib = _native.ffi(), _native.lib()
        sent, received = ffi.new("uint64_t *"), ffi.new("uint64_t *")
        traffic = {}
        for endpoint in self.rpc_servers:
            lib.pt_rpc_traffic(endpoint.encode(), sent, received)
            traffic[endpoint] = (int(sent[0]), int(received[0]))
        return traffic

    def context(self, **kwargs) -> "Context":
        """A new inference context on this model; see `Context` for the parameters."""
        from .context import Context
        return Context(self, **kwargs)

    def close(self) -> None:
        """Free the model, closing its contexts first (a call running on one in another thread is stopped: see
        Context.close). Safe to call twice, from any thread, or after a failed __init__."""
        for ctx in list(self.contexts):
            ctx.close()
        with self._lock:
            ptr, self._ptr = self._ptr, None
            if ptr is not None and self._holds:
                self._orphan, ptr = ptr, None  # freed by release_for_context() once the last abandoned call returned
        if ptr is not None:
            self._free(ptr)
            _native.drain_log()
        if self.memory_plan is not None:
            self.memory_plan.close()

    def hold_for_context(self, key: int) -> None:
        """A context's freeing waits for an abandoned call: the model must outlive it."""
        with self._lock:
            self._holds.add(key)

    def release_for_context(self, key: int) -> None:
        with self._lock:
            self._holds.discard(key)
            ptr = self._orphan if not self._holds else None
            if ptr is not None:
                self._orphan = None
        if ptr is not None:
            self._free(ptr)

    def _free(self, ptr) -> None:
        _native.lib().pt_model_free(ptr)

    def __enter__(self) -> "Model":
        return self

    def __repr__(self) -> str:
        if not self._ptr:
            return "Model(closed)"
        host = f", host_tensors={self.host_tensors!r}" if self.host_tensors else ""
        return f"Model({str(self.path)!r}, n_layer={self.n_layer}, devices={self.devices}{host})"

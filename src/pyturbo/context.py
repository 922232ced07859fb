"""`Context`: a llama.cpp context on a `Model`, with standard and pipelined prefill."""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
import time
from typing import Callable, Sequence

import numpy as np

from . import _calls, _memory, _native, policy, settings
from .context_options import FLASH_ATTN, RPC_WIRE, check_context_options, is_int
from .devices import default_threads
from .errors import ContextBusyError, ContextCreateError, ContextDeadError, PrefillError
from .results import Captured, GeneratedTokens, PrefillResult
from .timeline import UbatchRecord

log = logging.getLogger("pyturbo")

def fits(n_tokens: int, n_ctx: int, n_past: int = 0) -> bool:
    """The one rule for "too long": n_tokens more fit in a context of n_ctx positions that holds n_past. A prompt to
    generate from asks for one position more, its answer's first token (generation.check_prompt)."""
    return n_past + n_tokens <= n_ctx


class PromptCache:
    """The token ids the KV cache holds, when known: with them a new prompt reuses the longest common prefix and only
    the rest is prefilled (llama-server's cache_prompt). Held by a `Context`, which forgets them on reset(); written
    by the generation that fills the cache (pyturbo.generation), read by whoever picks a context for a prompt."""

    def __init__(self):
        self._tokens: list[int] | None = None

    @property
    def tokens(self) -> list[int]:
        """What the cache was last known to hold (a copy; [] when unknown)."""
        return list(self._tokens or [])

    def known(self, n_past: int) -> list[int] | None:
        """The tokens, if they still describe a cache of n_past positions (else something else wrote to it)."""
        return self._tokens if self._tokens is not None and len(self._tokens) == n_past else None

    def set(self, tokens: Sequence[int] | None) -> None:
        self._tokens = None if tokens is None else [int(t) for t in tokens]

    def append(self, token: int) -> None:
        if self._tokens is not None:
            self._tokens.append(int(token))

    def forget(self) -> None:
        self._tokens = None


@contextlib.contextmanager
def _held(ctx: "Context", what: str, check: bool = True):
    """This thread holds the context for the block (see Context._claim), with Ctrl-C guarded (see
    _calls.InterruptGuard); check: refuse a dead context and raise a Ctrl-C that the previous call left pending."""
    ctx._claim(what, check)
    outermost = guarded = False
    try:
        outermost = ctx._depth == 1
        if outermost:
            ctx._guard = _calls.InterruptGuard().__enter__()
            guarded = True
        yield
        # a Ctrl-C recorded after the work settled: the call completed, so the next call raises it
        ctx._pending_interrupt = ctx._pending_interrupt or (outermost and ctx._guard.recorded)
    finally:
        if guarded:
            ctx._guard.__exit__()
        ctx._depth -= 1
        ctx._lock.release()


def _exclusive(check: bool = True):
    """A method that runs while this thread holds the context (_held)."""
    def wrap(method):
        @functools.wraps(method)
        def claimed(self, *args, **kwargs):
            with _held(self, method.__name__, check):
                return method(self, *args, **kwargs)
        return claimed
    return wrap


class Context(_native.NativeHandle):
    """An inference context (KV cache, compute buffers) on a model; use as a context manager or call close().

    n_batch is the size of each llama_decode call a prefill makes (as llama-server feeds a prompt); n_ubatch the
    size of the physical batches those are cut into (the units the pipeline keeps in flight).

    first_ubatch (opt-in, default None: every ubatch has n_ubatch tokens, the last the rest): a prefill's first
    ubatch has this many tokens, the following ones n_ubatch, the last the rest. The work before any device can start
    (the host's set-up of the first ubatch and its embedding lookup on the CPU) scales with the first ubatch, and a
    pipeline waits for it once per prompt. Both paths then run the same ubatches, so the pipelined result equals the
    standard path's with the same first_ubatch as it does for uniform ones. Against uniform ubatches the kernels see
    other shapes and the logits differ by rounding (bound: results.FIRST_UBATCH_TOLERANCE of the largest logit and the
    same top token; tests/test_pipeline.py, tests/test_cuda.py).

    rpc_transfers: how the pipeline moves activations between RPC workers. "direct" (default): each worker sends its
    result to the next worker itself, while it computes the next ubatch, so they do not cross this process's link
    (where a worker cannot reach the next one they are relayed, and PrefillResult.transfers says why); "relay":
    always through this process, as llama.cpp's own path does. The bytes are the same either way.
    rpc_wire (opt-in): "f16" or "bf16" sends those copies in half the bytes, for slow links between workers; the
    activations are rounded on the way, so the logits differ from the exact path within results.RPC_WIRE_TOLERANCE.

    Before anything is allocated, the KV cache and compute buffers are checked against each device's free memory:
    MemoryError says what does not fit and what to lower. One call at a time: a call from a second thread while one
    runs raises ContextBusyError; close() from another thread stops the running call first (see close()).
    """

    _lock = None  # a failed __init__ leaves nothing to close
    _call: _calls.BackgroundCall | None = None
    _guard: _calls.InterruptGuard | None = None
    _owner: str | None = None
    _capture: Captured | None = None  # open capture() block

    def __init__(self, model, *, n_ctx: int = 4096, n_batch: int = 2048, n_ubatch: int = 512,
                 n_threads: int | None = None, flash_attn: bool | str | None = None, max_in_flight: int = 0,
                 first_ubatch: int | None = None, rpc_transfers: str = "direct", rpc_wire: str | None = None,
                 n_seq: int = 1, kv_unified: bool = True):
        if model.closed:
            raise ValueError("the model is closed")
        check_context_options(n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_ubatch, n_threads=n_threads,
                              flash_attn=flash_attn, max_in_flight=max_in_flight, first_ubatch=first_ubatch,
                              n_seq=n_seq, kv_unified=kv_unified, rpc_transfers=rpc_transfers, rpc_wire=rpc_wire)
        self.first_ubatch = first_ubatch
        self.rpc_transfers, self.rpc_wire = rpc_transfers, rpc_wire
        n_threads = n_threads or default_threads(model.devices, model.host_tensors is not None)
        self.model = model
        self.n_ctx, self.n_batch, self.n_ubatch, self.n_threads = n_ctx, n_batch, n_ubatch, n_threads
        self.flash_attn = flash_attn
        self.max_in_flight = max_in_flight
        self.n_seq, self.kv_unified = n_seq, kv_unified
        # the positions one sequence can hold: all cells of a unified cache, else its share
        self.n_ctx_seq = n_ctx if kv_unified else n_ctx // n_seq
        self.prompt_cache = PromptCache()
        self._warm_paths: set[str] = set()  # paths that ran here once already (their first run allocates)
        self._lock = threading.RLock()     # held by the thread running a call on this context
        self._depth = 0                    # nested calls of that thread (prefill reads n_past)
        self._closing = threading.Event()  # close() from another thread: stop the running call
        self._dead: str | None = None      # why the context is unusable, when Python knows better than C
        self._pending_interrupt = False    # a Ctrl-C came as a call completed: the next call raises it
        self._pipeline_checked = False     # the pipeline's buffers were found to fit (they stay allocated)
        # environment switches, read once here
        self._pipeline_override = policy.env_override(os.environ)
        host_staging = settings.read("PYTURBO_PIPELINE_HOST_STAGING")
        for name, on in (("PYTURBO_PIPELINE", self._pipeline_override), ("PYTURBO_PIPELINE_HOST_STAGING", host_staging)):
            if on:
                log.warning("%s is set: %s", name, on)
        model.check_usable()
        interrupted = lambda: model.disconnect_workers("creating a context was interrupted")  # noqa: E731
        self._needs = None if model.memory_plan is None else _calls.run_or_undo(  # asks the workers: interruptible
            lambda: _memory.check_context(model.memory_plan, n_ctx, n_batch, n_ubatch, FLASH_ATTN[flash_attn]),
            undo=lambda _: None, disconnect=interrupted)
        ffi, lib = _native.ffi(), _native.lib()
        ptr, error = _calls.run_or_undo(
            lambda: _native.with_error(lib.pt_context_new, model.handle, n_ctx, n_batch, n_ubatch, n_threads,
                                       FLASH_ATTN[flash_attn], max_in_flight, int(host_staging),
                                       int(rpc_transfers == "relay"), RPC_WIRE[rpc_wire], n_seq,
                                       int(kv_unified)),
            undo=lambda r: lib.pt_context_free(r[0]), disconnect=interrupted)
        _native.drain_log()
        if ptr == ffi.NULL:
            model.check_workers()  # a worker that died (or was OOM-killed) meanwhile: ContextDeadError
            raise ContextCreateError(error)
        self._ptr = ptr
        self.layout = policy.Layout(stock_overlaps=bool(lib.pt_context_stock_overlaps(ptr)))
        # the executor decides how many ubatches it keeps in flight (max_in_flight, or its default); asked, not
        # re-decided here, for the memory check of their compute buffers
        self.n_in_flight = lib.pt_context_n_in_flight(ptr)
        model.contexts.add(self)

    # ---- prefill and decode ---------------------------------------------------------------------------------------

    @property
    @_exclusive(check=False)
    def n_past(self) -> int:
        """Tokens already in the KV cache (of sequence 0)."""
        return self.seq_len(0)

    @_exclusive(check=False)
    def seq_len(self, seq: int) -> int:
        """Positions sequence `seq` holds in the KV cache."""
        return _native.lib().pt_context_n_past(self._live(), self._check_seq(seq))

    @_exclusive()
    def prefill(self, tokens: str | Sequence[int] | np.ndarray, pipeline: bool | str = "auto",
                on_ubatch: Callable[[UbatchRecord], None] | None = None, *, seq: int = 0) -> PrefillResult:
        """Append tokens (token ids, or text, tokenized with BOS when the sequence is empty) to sequence `seq` and
        return a `PrefillResult` (the last token's logits, timings, which path ran and why).

        pipeline: "auto" (or True, the default) keeps several ubatches in flight over the model's layer devices where
        that is faster than llama.cpp's standard path (`decision` says why); "force" wherever it is safe; "off" (or
        False) takes the standard path. Where pipelining is not safe or not possible (one device, fewer than two
        ubatches, its buffers do not fit, ...) the standard path runs and `fallback_reason` says why.
        on_ubatch(record) is called for every (ubatch, stage) of a pipelined prefill as it completes. Ctrl-C:
        KeyboardInterrupt means the context is as it was before the call; see README, "Failure behaviour", for the
        other outcomes.
        """
        mode = policy.normalize_mode(pipeline)
        toks = self._check_tokens(tokens, seq)
        key = self._calibration_key(len(toks), self.seq_len(seq))
        # a context's first prefill decides from first runs (fresh-context costs), later ones from warm runs
        decide_key = key if self._warm_paths else policy.first_run_key(key)
        now = time.time()
        measured = policy.calibration().runs(decide_key, now) if mode == "auto" else None
        ask_pipeline, decision = policy.decide(mode, self.layout, self._pipeline_override, measured, now)
        refused = ""
        if ask_pipeline:  # its buffers must fit before its first use
            ask_pipeline, refused = self._pipeline_fits(True, toks)
        ffi, lib = _native.ffi(), _native.lib()
        ptr = self._live()
        c_toks = ffi.from_buffer("int32_t[]", toks)
        pipeline_arg = lib.LLAMA_TURBO_PIPELINE_ON if ask_pipeline else lib.LLAMA_TURBO_PIPELINE_OFF
        first_ubatch = self.first_ubatch or 0   # 0: n_batch-sized calls (uniform ubatches)
        result, raw = self._run_replay(
            lambda c_cb, result: lib.pt_prefill(ptr, seq, c_toks, len(toks), pipeline_arg, first_ubatch, c_cb,
                                                ffi.NULL, result), on_ubatch if ask_pipeline else None, ask_pipeline)
        prefill = self._prefill_result(result, raw, len(toks), decision, refused)
        self._measured(key, prefill.path, ask_pipeline, result.n_ubatches, prefill.tokens_per_second)
        return prefill

    def _run_replay(self, call, on_ubatch, want_records: bool):
        """call(record_callback, result) runs a replay (pt_prefill, pt_capture_replay) interruptibly; returns the
        result struct and the raw records, or raises what it came to (KeyboardInterrupt for an abort, ContextDeadError
        for a failed device, PrefillError)."""
        ffi, lib = _native.ffi(), _native.lib()
        ptr = self._live()
        result = ffi.new("struct llama_turbo_result *")
        raw: list[tuple] = []
        callback_error: list[BaseException] = []

        def on_record(rec, _user):
            raw.append((rec.ubatch, rec.pos0, rec.n_tokens, rec.stage, ffi.string(rec.device).decode(),
                        rec.t_start_us, rec.t_end_us, ffi.string(rec.clock).decode()))
            if on_ubatch is not None and not callback_error:
                try:
                    on_ubatch(UbatchRecord.from_raw(raw[-1], t0_us))
                except BaseException as e:  # keep it for the caller, stop the prefill
                    callback_error.append(e)
                    lib.pt_request_abort(ptr)

        t0_us = lib.pt_time_us()
        c_cb = ffi.callback("llama_turbo_record_callback", on_record) if want_records else ffi.NULL
        self._run_interruptible(lambda: call(c_cb, result))
        _native.drain_log()
        if callback_error:
            raise callback_error[0]
        self._raise_for_status(result)
        return result, raw

    def _raise_for_status(self, result) -> None:
        ffi, lib = _native.ffi(), _native.lib()
        if result.status == lib.LLAMA_TURBO_ABORTED:
            raise KeyboardInterrupt("prefill aborted; the context is as it was before the call")
        if result.status != lib.LLAMA_TURBO_OK:
            msg = ffi.string(result.error).decode(errors="replace")
            if result.status == lib.LLAMA_TURBO_DEVICE_FAILED:
                raise ContextDeadError(msg)
            if result.status == lib.LLAMA_TURBO_NO_KV_SLOT:
                msg = (f"no room in the KV cache ({self.n_ctx} cells" +
                       (", shared by the sequences" if self.kv_unified and self.n_seq > 1 else "") + f"): {msg}")
            raise PrefillError(msg)

    def _prefill_result(self, result, raw: list[tuple], n_tokens: int, decision: str, refused: str) -> PrefillResult:
        return PrefillResult.from_native(result, raw, self.model.devices, n_tokens, self.logits(), decision, refused)

    @_exclusive()
    def decode_tokens(self, tokens: Sequence[int] | np.ndarray, seqs: Sequence[int] | None = None,
                      logits: str = "all") -> np.ndarray | None:
        """One plain llama_decode call: token i is appended to sequence seqs[i] (default: all to sequence 0), so
        several sequences can take a step together, as llama-server's slots do. Returns the logits of every token
        (logits="all", [n, n_vocab]) or of the last one ("last", [1, n_vocab]); None inside capture(), where the
        call is queued for the replay instead."""
        toks = self.model.check_tokens(tokens)
        seq_arr = np.zeros(toks.size, dtype=np.int32) if seqs is None else np.asarray(seqs, dtype=np.int32)
        if seq_arr.shape != toks.shape:
            raise ValueError(f"seqs must name one sequence per token ({toks.size}), not {len(seq_arr)}")
        for seq in set(seq_arr.tolist()):
            self._check_seq(seq)
        if logits not in ("all", "last"):
            raise ValueError(f"logits must be 'all' or 'last', not {logits!r}")
        want = np.ones(toks.size, dtype=np.int8) if logits == "all" else np.eye(1, toks.size, toks.size - 1, np.int8)[0]
        out = np.empty((int(want.sum()), self.model.n_vocab), dtype=np.float32)
        ffi, lib = _native.ffi(), _native.lib()
        ptr = self._live()
        result = ffi.new("struct llama_turbo_result *")
        if self._capture is not None:
            self._capture.n_tokens += toks.size
        c_out = ffi.NULL if self._capture is not None else ffi.from_buffer("float[]", out)
        self._run_interruptible(lambda: lib.pt_decode(ptr, toks.size, ffi.from_buffer("int32_t[]", toks),
                                                      ffi.from_buffer("int32_t[]", seq_arr),
                                                      ffi.from_buffer("int8_t[]", want), c_out, result))
        _native.drain_log()
        self._raise_for_status(result)
        return None if self._capture is not None else out

    @contextlib.contextmanager
    def capture(self, pipeline: bool | str = "force", on_ubatch: Callable[[UbatchRecord], None] | None = None):
        """Capture/replay around plain llama_decode calls: inside `with ctx.capture() as captured:`, decode_tokens()
        calls are queued; on leaving the block they are decoded as one series, pipelined if `pipeline` asks for it
        ("force"/True; "off"/False: the standard path) and it is safe, with the results the standard path gives for
        the same calls. `captured.result` is then the `PrefillResult` (logits of the last call's last output). An
        exception inside the block drops what was queued."""
        mode = policy.normalize_mode(pipeline)
        if mode == "auto":
            raise ValueError("capture() takes pipeline='force' or 'off' (it has no calibration of its own)")
        with _held(self, "capture"):
            lib = _native.lib()
            ptr = self._live()
            if lib.pt_capture_begin(ptr) != 0:
                raise PrefillError(_native.last_error())
            self._capture = captured = Captured()
            try:
                yield captured
            except BaseException:
                lib.pt_capture_discard(ptr)
                raise
            finally:
                self._capture = None
            result, raw = self._end_capture(mode == "force", on_ubatch)
            captured.result = self._prefill_result(result, raw, captured.n_tokens, f"capture ({mode})", "")

    def _end_capture(self, pipelined: bool, on_ubatch):
        lib = _native.lib()
        ptr = self._live()
        arg = lib.LLAMA_TURBO_PIPELINE_ON if pipelined else lib.LLAMA_TURBO_PIPELINE_OFF
        return self._run_replay(lambda c_cb, result: lib.pt_capture_replay(ptr, arg, c_cb, _native.ffi().NULL, result),
                                on_ubatch, pipelined)

    def _measured(self, key: str, path: str, asked_pipeline: bool, n_ubatches: int, tokens_per_second: float) -> None:
        """Record a prefill's throughput for auto's decisions. Not when the executor fell back for safety (that says
        nothing about the choice). A path's first run in this context allocates (slots, compute buffers): it is
        recorded apart (policy.first_run_key), so that contexts used for one prompt each still calibrate."""
        if n_ubatches < 2 or (path == "standard" and asked_pipeline):
            return
        policy.calibration().record(key if path in self._warm_paths else policy.first_run_key(key), path,
                                    tokens_per_second)
        self._warm_paths.add(path)

    def calibrate(self, tokens: str | Sequence[int] | np.ndarray, runs: int = policy.SAMPLES_PER_PATH) -> dict:
        """Measure both paths on these tokens, alternating, until each has `runs` warm measurements for this setting
        (those already made, in this process or persisted, count), so that pipeline='auto' decides for prompts of
        this length from then on. Needs and leaves an empty KV cache. Returns the measurements for this setting
        ({"pipelined": [tok/s, ...], "standard": [...]}); runs nothing when it is calibrated already."""
        if self.n_past != 0:
            raise ValueError("calibrate() runs from an empty KV cache: call reset() first")
        key = self._calibration_key(len(self._check_tokens(tokens)), 0)
        measured = policy.calibration().measured(key)
        for _ in range(2 * runs + 2):   # bounded: a path whose first run here is a warm-up takes one run more
            missing = [path for path in ("pipelined", "standard") if len(measured.get(path, [])) < runs]
            if not missing:
                break
            for path in missing:
                self.prefill(tokens, pipeline="force" if path == "pipelined" else "off")
                self.reset()
            measured = policy.calibration().measured(key)
        return measured

    def _calibration_key(self, n_tokens: int, n_past: int) -> str:
        return policy.calibration_key(self.model.identity, self.model.stage_kinds, self.n_batch, self.n_ubatch,
                                      self.flash_attn, n_tokens, n_past, self.model.layers_per_stage,
                                      self.first_ubatch)

    def decode(self, token: int) -> np.ndarray:
        """Append one token (standard path) and return its logits. Generation decodes through here too."""
        # "off": one token is one ubatch, which the pipeline cannot split; "auto" would come to the same path after
        # a calibration lookup and a fallback
        return self.prefill([token], pipeline="off").logits

    def generate(self, n: int, logits: np.ndarray | None = None) -> "GeneratedTokens":
        """Greedily generate n tokens, continuing from `logits` (default: the last computed logits); each is
        decoded into the KV cache. End-of-generation tokens do not stop it.

        Returns the tokens (a list) with `finish_reason`: "length" when all n were generated, "context" when the
        KV cache filled up first. Then the list is shorter than n and its last token is not in the KV cache (there
        is no room for it); `complete()`/`stream()` report that case as "length", as the OpenAI API does."""
        if not is_int(n) or n < 0:
            raise ValueError(f"n must be an int >= 0, not {n!r}")
        if logits is None:
            logits = self.logits()
        out = GeneratedTokens()
        for _ in range(n):
            tok = int(np.argmax(logits))
            out.append(tok)
            if self.n_past >= self.n_ctx_seq:  # checked before decoding: the tokens so far are kept, not raised away
                out.finish_reason = "context"
                return out
            logits = self.decode(tok)
        return out

    @_exclusive()
    def logits(self) -> np.ndarray:
        """Logits of the last computed token (float32 [n_vocab])."""
        ffi, lib = _native.ffi(), _native.lib()
        out = np.empty(self.model.n_vocab, dtype=np.float32)
        if lib.pt_get_logits(self._live(), ffi.from_buffer("float[]", out)) != 0:
            error = _native.last_error()
            self._raise_if_dead()
            raise PrefillError(f"reading the logits failed: {error}")
        return out

    @_exclusive()
    def kv_state(self, seq: int = 0) -> bytes:
        """The serialized KV cache of a sequence (llama_state_seq_get_data): for exact comparisons."""
        ffi, lib = _native.ffi(), _native.lib()
        ptr = self._live()
        seq = self._check_seq(seq)

        def read():  # from the workers: interruptible
            size = lib.pt_state_size(ptr, seq)
            buf = ffi.new("uint8_t[]", size)
            got, error = _native.with_error(lib.pt_state_get, ptr, seq, buf, size)
            return size, got, buf, error

        size, got, buf, error = self._run_interruptible(read, rolled_back=lambda _: False)
        if got != size:
            self._raise_if_dead()
            raise PrefillError(f"reading the KV cache failed: {error}")
        return bytes(ffi.buffer(buf, size))

    @_exclusive()
    def reset(self) -> None:
        """Clear the KV cache."""
        ptr = self._live()
        self._run_interruptible(lambda: _native.lib().pt_context_reset(ptr), rolled_back=lambda _: False)
        self.prompt_cache.forget()
        self._raise_if_dead()  # a worker that died during the reset

    @_exclusive()
    def truncate(self, n_keep: int, seq: int = 0) -> bool:
        """Drop every position >= n_keep from a sequence of the KV cache (a prompt prefix to reuse); False when the
        cache cannot be cut there (then reset() it)."""
        return _native.lib().pt_context_truncate(self._live(), self._check_seq(seq), int(n_keep)) == 0

    @_exclusive()
    def copy_prefix(self, src_seq: int, dst_seq: int, n_tokens: int) -> None:
        """Make sequence dst_seq hold the first n_tokens positions of src_seq and nothing else (a prompt prefix two
        sequences share: the KV cells are shared, not copied)."""
        lib = _native.lib()
        if lib.pt_context_copy_prefix(self._live(), self._check_seq(src_seq), self._check_seq(dst_seq),
                                      int(n_tokens)) != 0:
            raise PrefillError(_native.last_error())

    # ---- plumbing -------------------------------------------------------------------------------------------------

    def _check_seq(self, seq) -> int:
        if not is_int(seq) or not 0 <= seq < self.n_seq:
            raise ValueError(f"seq must be an int from 0 to {self.n_seq - 1} (the context's n_seq), not {seq!r}")
        return int(seq)

    def _check_tokens(self, tokens, seq: int = 0) -> np.ndarray:
        n_past = self.seq_len(seq)
        if isinstance(tokens, str):
            tokens = self.model.tokenize(tokens, add_special=n_past == 0)
        arr = self.model.check_tokens(tokens)   # already contiguous int32
        if not fits(arr.size, self.n_ctx_seq, n_past):
            need = (n_past + arr.size) * (1 if self.kv_unified else self.n_seq)
            raise ValueError(f"{arr.size} tokens do not fit: the context holds {self.n_ctx_seq} per sequence and "
                             f"{n_past} are used; create the context with n_ctx >= {need} or call reset()")
        return arr

    def request_abort(self) -> None:
        """Ask the call running on this context, if any, to stop (from any thread; nothing when it is closed)."""
        ptr = self._ptr
        if ptr is not None:
            _native.lib().pt_request_abort(ptr)

    def _live(self):
        if self._ptr is None:
            raise ValueError("the context is closed")
        return self._ptr

    def _run_interruptible(self, fn, rolled_back: Callable[[object], bool] | None = None):
        """fn() (a C call on this context) on a helper thread, so that Ctrl-C and close() from another thread reach
        it; returns its value. rolled_back(value): the call was aborted and undid its work.

        A Ctrl-C (or close()) stops it with _calls.BackgroundCall.stop: if the call returns rolled back,
        KeyboardInterrupt (ValueError after a close()); if it completed anyway, its value is returned and the Ctrl-C
        is kept for the next call (raised there before anything changes); if it only returned once the workers were
        disconnected, or not at all, a device may be mid-operation: the context is dead (ContextDeadError)."""
        ptr = self._ptr
        lib = _native.lib()
        if rolled_back is None:  # pt_prefill's status
            rolled_back = lambda status: status == lib.LLAMA_TURBO_ABORTED  # noqa: E731
        self._call = call = _calls.BackgroundCall(fn, "pyturbo-call")
        how, interrupt = _calls.run_guarded(call, abort=lambda: lib.pt_request_abort(ptr),
                                            disconnect=lambda: self.model.disconnect_workers("a call was stopped"),
                                            stop_when=self._closing.is_set, guard=self._guard)
        if how == "finished" and interrupt is None and not self._closing.is_set():
            return call.result()
        why = "interrupted (Ctrl-C)" if interrupt is not None else "the context was closed by another thread"
        if how == "not-started":
            raise self._stopped(why, interrupt, "before it started: nothing changed")
        if how == "finished":
            value = call.result()
            if not rolled_back(value):
                self._pending_interrupt = interrupt is not None
                return value
            raise self._stopped(why, interrupt, "the context is as it was before the call")
        self._dead = (f"{why} while a device was busy with this context; it did not stop within "
                      f"{2 * _calls.STOP_GRACE_S:.1f} s" + (", so its workers were disconnected" if how == "disconnected"
                                                             else " and is still running in the background"))
        raise ContextDeadError(f"{self._dead}: the context cannot be used any more") from interrupt

    @staticmethod
    def _stopped(why: str, interrupt: KeyboardInterrupt | None, state: str) -> BaseException:
        if interrupt is not None:
            return KeyboardInterrupt(f"{why}; {state}")
        return ValueError(f"{why} during this call; {state}")

    def _claim(self, what: str, check: bool) -> None:
        """This thread holds the context for one call (released by _exclusive): ContextBusyError if another thread
        does, ValueError if it is closed; with check, ContextDeadError if it is dead and KeyboardInterrupt for a
        Ctrl-C that the previous call left pending."""
        if self._lock is None:
            raise ValueError("the context is closed")
        if not self._lock.acquire(blocking=False):
            raise ContextBusyError(f"{what}(): another thread ({self._owner}) is running a call on this context; a "
                                   f"context runs one call at a time: use one context per thread, or wait for the "
                                   f"call to return")
        try:
            if self._ptr is None or (self._depth == 0 and self._closing.is_set()):
                raise ValueError("the context is closed")
            if check and self._depth == 0:
                self._raise_if_dead()
                if self._pending_interrupt:
                    self._pending_interrupt = False
                    raise KeyboardInterrupt("interrupted: the Ctrl-C came as the previous call on this context "
                                            "completed (its work is kept); raised here, before this call changed anything")
        except BaseException:
            self._lock.release()
            raise
        if self._depth == 0:
            self._owner = threading.current_thread().name
        self._depth += 1

    def _raise_if_dead(self) -> None:
        if self._dead is None and _native.lib().pt_context_is_dead(self._ptr):
            self._dead = "a device failed during an earlier call (its error said which)"
        if self._dead is not None:
            raise ContextDeadError(f"{self._dead}: the context cannot be used any more; create a new context (and "
                                   f"model, if a worker failed)")
        self.model.check_workers()

    def _pipeline_fits(self, pipeline: bool, tokens) -> tuple[bool, str]:
        """(pipeline, why not): the pipeline's compute buffers (one set per ubatch in flight, kept once allocated)
        must fit in the memory free now, checked before its first use."""
        n = len(tokens) if hasattr(tokens, "__len__") and not isinstance(tokens, str) else 0
        if (not pipeline or self._pipeline_checked or self._needs is None or len(self.model.devices) < 2
                or 0 < n <= self.n_ubatch):
            return pipeline, ""
        refused = _calls.run_or_undo(  # asks the workers: interruptible (a Ctrl-C here: nothing changed)
            lambda: _memory.pipeline_refusal(self._needs, self.model.memory_plan.endpoints, self.n_in_flight),
            undo=lambda _: None,
            disconnect=lambda: self.model.disconnect_workers("a prefill was interrupted"))
        self._pipeline_checked = not refused
        return not refused, refused

    def close(self) -> None:
        """Free the context; safe to call twice and from any thread. A call running in another thread is stopped
        first (as by Ctrl-C: it raises ValueError there, or ContextDeadError if a device had to be abandoned) and
        this waits for it, about a second at most; a call that could not be stopped frees the context when it
        returns. Not from inside the context's own call (an on_ubatch callback): raise an exception there."""
        if self._lock is None:
            return
        call = self._call
        if call is not None and threading.current_thread() is call.thread:
            raise RuntimeError("close() cannot be called from inside this context's own call (an on_ubatch "
                               "callback); raise an exception there to stop the prefill, then close")
        acquired = self._lock.acquire(blocking=False)
        if not acquired:
            self._closing.set()  # the running call's thread stops it and returns: within 2 * STOP_GRACE_S
            self.request_abort()
            # bounded: should the holder never release (an interrupt that landed between its lock and its try), close
            # anyway, deferring the free if a call is still running
            acquired = self._lock.acquire(timeout=4 * _calls.STOP_GRACE_S + 3)
        try:
            self._closing.clear()
            ptr, self._ptr = self._ptr, None
            call = self._call
            if ptr is None:
                return
            if call is not None and not call.done:  # an abandoned call still uses the context (and the model)
                model, key = self.model, id(self)
                model.hold_for_context(key)
                call.when_done(lambda: (self._free(ptr), model.release_for_context(key)))
            else:
                self._free(ptr)
                _native.drain_log()
        finally:
            if acquired:
                self._lock.release()

    def _free(self, ptr) -> None:
        _native.lib().pt_context_free(ptr)

    def __enter__(self) -> "Context":
        return self

    # ---- text generation and the prompt cache (pyturbo.generation) -------------------------------------------------

    def stream(self, prompt: str | Sequence[int], *, max_tokens: int = 16, stop: str | Sequence[str] = (),
               sampling: "SamplerSettings | None" = None, pipeline=True, cache_prompt: bool = True,
               ignore_eos: bool = False, min_tokens: int = 0, logprobs: int | None = None,
               lock=None, **settings) -> "Generation":
        """Generate from a prompt (text, tokenized with BOS and special tokens; or token ids), yielding `Piece`s of
        text as they are decoded (a multi-byte character split over tokens comes out whole).

        Stops at an end-of-generation token, at the first stop string (not included), or after max_tokens;
        ignore_eos=True never draws an end-of-generation token (llama.cpp's ignore_eos: their logits are -inf),
        min_tokens=N not before N tokens. Sampling is llama.cpp's sampler chain: pass
        `sampling=SamplerSettings(...)` or its fields as keywords (temperature=0 is greedy, the same tokens as
        generate()). logprobs=N: each Piece carries its token's log-probability and the N most likely tokens at
        that step (`piece.logprobs`, and `Completion.logprobs`): the log-softmax of the raw logits, before the
        sampler chain (temperature, top_k/top_p, penalties, logit_bias, the end-of-generation mask). With
        cache_prompt, the longest common prefix with what the KV cache holds from the previous call is reused and
        only the rest is prefilled, through the pipeline when it is long enough. The returned `Generation` has
        cancel() and, once iterated, result().
        """
        from .generation import Generation
        from .sampling import SamplerSettings
        sampling = SamplerSettings.from_call(sampling, settings)
        return Generation(self, prompt, max_tokens=max_tokens, stop=stop, sampling=sampling, pipeline=pipeline,
                          cache_prompt=cache_prompt, ignore_eos=ignore_eos, min_tokens=min_tokens, logprobs=logprobs,
                          lock=lock)

    def complete(self, prompt: str | Sequence[int], **kwargs) -> "Completion":
        """stream() run to the end: a `Completion` (text, tokens, finish_reason, n_prompt, n_cached, prefill, ...)."""
        gen = self.stream(prompt, **kwargs)
        for _ in gen:
            pass
        return gen.result()

    def chat(self, messages: Sequence[dict], **kwargs) -> "dict | Iterator[dict]":
        """Answer chat messages ([{"role": "user", "content": "..."}, ...]) as llama-cpp-python's
        create_chat_completion does: the prompt is rendered with the model's chat template (`model.chat_template`,
        or template=ChatTemplate(...)), and the answer is an OpenAI-shaped dict ("chat.completion": choices[0].message,
        finish_reason, usage); stream=True returns an iterator of "chat.completion.chunk" dicts instead.

        max_tokens (default: until the context is full), stop, logprobs=True with top_logprobs=N (choices[].logprobs
        .content, OpenAI's shape; log-softmax of the raw logits, see stream()), and every keyword of stream()
        (sampler settings, ignore_eos, min_tokens, pipeline, cache_prompt). Needs Jinja2 (pip install ".[server]")."""
        from .chat import chat_completion
        return chat_completion(self, messages, **kwargs)

"""`Context`: a llama.cpp context on a `Model`, with standard and pipelined prefill."""
from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from . import _native, policy
from .errors import ContextCreateError, ContextDeadError, PrefillError
from .timeline import Timeline, UbatchRecord

log = logging.getLogger("pyturbo")

FLASH_ATTN = {None: -1, "auto": -1, False: 0, True: 1}


@dataclass
class PrefillResult:
    n_tokens: int
    seconds: float
    logits: np.ndarray                 # float32 [n_vocab], of the last token
    path: str                          # "pipelined" or "standard"
    fallback_reason: str = ""          # why the standard path ran ("" when pipelined)
    decision: str = ""                 # why that path was asked for (policy.decide)
    n_ubatches: int = 0
    n_stages: int = 0
    n_in_flight: int = 0
    slot_buffer_bytes: int = 0         # compute buffers of all in-flight slots, all devices (pipelined path)
    timeline: Timeline = field(default_factory=Timeline)

    @property
    def tokens_per_second(self) -> float:
        return self.n_tokens / self.seconds if self.seconds > 0 else float("nan")


class Context(_native.NativeHandle):
    """An inference context (KV cache, compute buffers) on a model; use as a context manager or call close().

    n_batch is the size of each llama_decode call a prefill makes (as llama-server feeds a prompt); n_ubatch the
    size of the physical batches those are cut into (the units the pipeline keeps in flight).
    """

    def __init__(self, model, *, n_ctx: int = 4096, n_batch: int = 2048, n_ubatch: int = 512,
                 n_threads: int | None = None, flash_attn: bool | str | None = None, max_in_flight: int = 0):
        if model.closed:
            raise ValueError("the model is closed")
        for name, value in (("n_ctx", n_ctx), ("n_batch", n_batch), ("n_ubatch", n_ubatch)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, not {value!r}")
        if n_ubatch > n_batch:
            raise ValueError(f"n_ubatch ({n_ubatch}) must not exceed n_batch ({n_batch})")
        if flash_attn not in FLASH_ATTN:
            raise ValueError(f"flash_attn must be True, False or 'auto', not {flash_attn!r}")
        if not isinstance(max_in_flight, int) or max_in_flight < 0:
            raise ValueError(f"max_in_flight must be an int >= 0 (0: automatic), not {max_in_flight!r}")
        n_threads = n_threads or os.cpu_count() or 1
        self.model = model
        self.n_ctx, self.n_batch, self.n_ubatch, self.n_threads = n_ctx, n_batch, n_ubatch, n_threads
        self.flash_attn = flash_attn
        self._warm_paths: set[str] = set()
        # environment switches, read once here
        self._pipeline_override = policy.env_override(os.environ)
        host_staging = os.environ.get("PYTURBO_PIPELINE_HOST_STAGING", "0") not in ("", "0")
        for name, on in (("PYTURBO_PIPELINE", self._pipeline_override), ("PYTURBO_PIPELINE_HOST_STAGING", host_staging)):
            if on:
                log.warning("%s is set: %s", name, os.environ[name])
        ffi, lib = _native.ffi(), _native.lib()
        ptr = lib.pt_context_new(model._ptr, n_ctx, n_batch, n_ubatch, n_threads, FLASH_ATTN[flash_attn], max_in_flight,
                                 int(host_staging))
        _native.drain_log()
        if ptr == ffi.NULL:
            raise ContextCreateError(_native.last_error())
        self._ptr = ptr
        self.layout = policy.Layout(stages=tuple(model.devices), stock_overlaps=bool(lib.pt_context_stock_overlaps(ptr)))
        model._contexts.add(self)

    # ---- prefill and decode ---------------------------------------------------------------------------------------

    @property
    def n_past(self) -> int:
        """Tokens already in the KV cache."""
        return _native.lib().pt_context_n_past(self._live())

    def prefill(self, tokens: str | Sequence[int] | np.ndarray, pipeline: bool | str = "auto",
                on_ubatch: Callable[[UbatchRecord], None] | None = None) -> PrefillResult:
        """Append tokens (token ids, or text, tokenized with BOS when the cache is empty) to the sequence and return
        a `PrefillResult` (the last token's logits, timings, which path ran and why).

        pipeline: "auto" (or True, the default) keeps several ubatches in flight over the model's layer devices where
        that is faster than llama.cpp's standard path (`decision` says why); "force" wherever it is safe; "off" (or
        False) takes the standard path. Where pipelining is not safe or not possible (one device, fewer than two
        ubatches, ...) the standard path runs and `fallback_reason` says why. on_ubatch(record) is called for every
        (ubatch, stage) of a pipelined prefill as it completes. Ctrl-C interrupts it and leaves the context as it was
        before the call.
        """
        mode = policy.normalize_mode(pipeline)
        toks = self._check_tokens(tokens)
        key = self._calibration_key(len(toks), self.n_past)
        measured = policy.calibration().measured(key) if mode == "auto" else None
        ask_pipeline, decision = policy.decide(mode, self.layout, self._pipeline_override, measured)
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
        c_cb = ffi.callback("llama_turbo_record_callback", on_record) if ask_pipeline else ffi.NULL
        c_toks = ffi.from_buffer("int32_t[]", toks)
        pipeline_arg = lib.LLAMA_TURBO_PIPELINE_ON if ask_pipeline else lib.LLAMA_TURBO_PIPELINE_OFF
        self._run_interruptible(lambda: lib.pt_prefill(ptr, c_toks, len(toks), pipeline_arg, c_cb, ffi.NULL, result))
        _native.drain_log()
        if callback_error:
            raise callback_error[0]
        if result.status == lib.LLAMA_TURBO_ABORTED:
            raise KeyboardInterrupt("prefill aborted; the context is as it was before the call")
        if result.status != lib.LLAMA_TURBO_OK:
            msg = ffi.string(result.error).decode(errors="replace")
            if result.status == lib.LLAMA_TURBO_DEVICE_FAILED:
                raise ContextDeadError(msg)
            raise PrefillError(msg)
        seconds = (result.t_end_us - result.t_start_us) / 1e6
        path = "pipelined" if result.path == lib.LLAMA_TURBO_PATH_PIPELINED else "standard"
        self._measured(key, path, ask_pipeline, result.n_ubatches, len(toks) / seconds)
        timeline = Timeline.from_raw(raw, self.model.devices, result.t_start_us, seconds)
        return PrefillResult(
            n_tokens=len(toks), seconds=seconds, logits=self.logits(), path=path,
            fallback_reason=ffi.string(result.fallback_reason).decode(), decision=decision,
            n_ubatches=result.n_ubatches, n_stages=result.n_stages, n_in_flight=result.n_in_flight,
            slot_buffer_bytes=result.slot_buffer_bytes, timeline=timeline)

    def _measured(self, key: str, path: str, asked_pipeline: bool, n_ubatches: int, tokens_per_second: float) -> None:
        """Record a prefill's throughput for auto's decisions. Not when the executor fell back for safety (that says
        nothing about the choice), nor a path's first run in this context (it allocates: slots, compute buffers)."""
        if n_ubatches < 2 or (path == "standard" and asked_pipeline):
            return
        if path in self._warm_paths:
            policy.calibration().record(key, path, tokens_per_second)
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
                                      self.flash_attn, n_tokens, n_past)

    def decode(self, token: int) -> np.ndarray:
        """Append one token (standard path) and return its logits."""
        return self.prefill([token], pipeline="off").logits

    def generate(self, n: int, logits: np.ndarray | None = None) -> list[int]:
        """Greedily generate n tokens, continuing from `logits` (default: the last computed logits)."""
        if logits is None:
            logits = self.logits()
        out = []
        for _ in range(n):
            tok = int(np.argmax(logits))
            out.append(tok)
            logits = self.decode(tok)
        return out

    def logits(self) -> np.ndarray:
        """Logits of the last computed token (float32 [n_vocab])."""
        ffi, lib = _native.ffi(), _native.lib()
        out = np.empty(self.model.n_vocab, dtype=np.float32)
        if lib.pt_get_logits(self._live(), ffi.from_buffer("float[]", out)) != 0:
            self._raise_native_error("reading the logits failed")
        return out

    def kv_state(self) -> bytes:
        """The serialized KV cache of the sequence (llama_state_seq_get_data): for exact comparisons."""
        ffi, lib = _native.ffi(), _native.lib()
        ptr = self._live()
        size = lib.pt_state_size(ptr)
        buf = ffi.new("uint8_t[]", size)
        got = lib.pt_state_get(ptr, buf, size)
        if got != size:
            self._raise_native_error("reading the KV cache failed")
        return bytes(ffi.buffer(buf, size))

    def reset(self) -> None:
        """Clear the KV cache."""
        if _native.lib().pt_context_reset(self._live()) != 0:
            raise ContextDeadError(_native.last_error())
        self._kv_tokens = None  # the prompt cache's record of the cache (see stream())

    # ---- plumbing -------------------------------------------------------------------------------------------------

    def _check_tokens(self, tokens) -> np.ndarray:
        if isinstance(tokens, str):
            tokens = self.model.tokenize(tokens, add_special=self.n_past == 0)
        arr = self.model.check_tokens(tokens)
        if self.n_past + arr.size > self.n_ctx:
            raise ValueError(f"{arr.size} tokens do not fit: the context holds {self.n_ctx} and {self.n_past} are used; "
                             f"create the context with n_ctx >= {self.n_past + arr.size} or call reset()")
        return np.ascontiguousarray(arr, dtype=np.int32)

    def _raise_native_error(self, what: str):
        """The C call just failed: ContextDeadError if a device failure killed the context, else PrefillError."""
        dead = _native.lib().pt_context_is_dead(self._live())
        raise (ContextDeadError if dead else PrefillError)(f"{what}: {_native.last_error()}")

    def _live(self):
        if self._ptr is None:
            raise ValueError("the context is closed")
        return self._ptr

    def _run_interruptible(self, fn) -> None:
        """Run a long C call on a helper thread so that Ctrl-C reaches the main thread; then abort it cleanly."""
        done = threading.Event()
        errors: list[BaseException] = []

        def target():
            try:
                fn()
            except BaseException as e:
                errors.append(e)
            finally:
                done.set()

        thread = threading.Thread(target=target, name="pyturbo-prefill", daemon=True)
        thread.start()
        try:
            while not done.wait(0.05):
                pass
        except KeyboardInterrupt:
            _native.lib().pt_request_abort(self._ptr)
            done.wait()
            raise
        finally:
            thread.join()
        if errors:
            raise errors[0]

    def _free(self, ptr) -> None:
        _native.lib().pt_context_free(ptr)

    def __enter__(self) -> "Context":
        return self

    # ---- text generation and the prompt cache (pyturbo.generation) -------------------------------------------------

    _kv_tokens: list[int] | None = None  # the tokens in the KV cache when the prompt cache knows them

    def stream(self, prompt: str | Sequence[int], *, max_tokens: int = 16, stop: str | Sequence[str] = (),
               sampling: "SamplerSettings | None" = None, pipeline=True, cache_prompt: bool = True,
               lock=None, **settings) -> "Generation":
        """Generate from a prompt (text, tokenized with BOS and special tokens; or token ids), yielding `Piece`s of
        text as they are decoded (a multi-byte character split over tokens comes out whole).

        Stops at an end-of-generation token, at the first stop string (not included), or after max_tokens.
        Sampling is llama.cpp's sampler chain: pass `sampling=SamplerSettings(...)` or its fields as keywords
        (temperature=0 is greedy, the same tokens as generate()). With cache_prompt, the longest common prefix with
        what the KV cache holds from the previous call is reused and only the rest is prefilled, through the
        pipeline when it is long enough. The returned `Generation` has cancel() and, once iterated, result().
        """
        from .generation import Generation
        from .sampling import SamplerSettings
        if settings:
            unknown = sorted(set(settings) - set(SamplerSettings.names()))
            if unknown:
                raise TypeError(f"unknown sampler setting(s) {unknown}; known: {list(SamplerSettings.names())}")
            if sampling is not None:
                raise TypeError("pass either sampling=SamplerSettings(...) or its fields as keywords, not both")
            sampling = SamplerSettings(**settings)
        return Generation(self, prompt, max_tokens=max_tokens, stop=stop, sampling=sampling, pipeline=pipeline,
                          cache_prompt=cache_prompt, lock=lock)

    def complete(self, prompt: str | Sequence[int], **kwargs) -> "Completion":
        """stream() run to the end: a `Completion` (text, tokens, finish_reason, n_prompt, n_cached, prefill, ...)."""
        gen = self.stream(prompt, **kwargs)
        for _ in gen:
            pass
        return gen.result()

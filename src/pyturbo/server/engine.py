"""The model owner: loads the model (for --demo also its local RPC workers) and one context whose --parallel
sequences a batched generator serves (pyturbo.batching), calibrates the prefill paths at start-up, hands it the
requests, and reloads the model after a device failure.

Concurrency: the --parallel sequences share one KV cache of parallel x --n-ctx cells, and each may hold --n-ctx
positions (llama-server's -c / -np split, so every request can always use its --n-ctx). Every decode step puts each
generating request's next token into one llama_decode; a prompt that arrives while others generate prefills in chunks
between their steps, so none of them waits longer than about --max-gap-ms for its next token (a prompt alone
prefills at once). Further requests wait in arrival order; a request's tokens come back to its HTTP handler on the
event loop (`Run`).
"""
from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from dataclasses import dataclass, field

from .. import policy
from ..batching import FATAL, BatchedGeneration, BatchedGenerator
from ..chat import ChatTemplate
from ..errors import PyturboError, WorkerError
from ..generation import Completion, Piece, check_prompt, prompt_tokens
from ..model import Model, check_reachable
from ..sampling import SamplerSettings
from .settings import ServerSettings

log = logging.getLogger("pyturbo.server")
RETRY_SECONDS = 1.0


class Unavailable(Exception):
    """The model cannot serve now (a device failed, it is reloading); `endpoints` names the failed RPC workers."""

    def __init__(self, message: str, endpoints: list[str] | None = None):
        super().__init__(message)
        self.endpoints = endpoints or []


class PromptTooLong(ValueError):
    pass


@dataclass
class Job:
    tokens: list[int]
    max_tokens: int | None = None
    stop: list[str] = field(default_factory=list)
    sampling: SamplerSettings = field(default_factory=SamplerSettings)
    cache_prompt: bool = True
    pipeline: str | None = None     # "auto", "force" or "off" (settings.PIPELINE_MODES); None: the server's --pipeline
    ignore_eos: bool = False        # the library's stream() options of the same names
    min_tokens: int = 0
    logprobs: int | None = None     # how many most likely tokens per step; None: no logprobs


@dataclass
class Outcome:
    completion: Completion
    ttft_seconds: float             # arrival to the first sampled token
    queue_seconds: float            # arrival to a slot
    pipeline: str


class Run:
    """One request on the batched generator. Its pieces are handed over from the generator's thread: next() gives
    `Piece`s, then the `Outcome`, or raises what failed it."""

    def __init__(self, loop, t_arrival: float, pipeline: str):
        self.t_arrival, self.pipeline = t_arrival, pipeline
        self.t_submit = time.perf_counter()
        self.request: BatchedGeneration | None = None
        self._loop = loop
        self._queue: asyncio.Queue = asyncio.Queue()
        self.finished = False

    def post(self, item) -> None:  # from the generator's thread
        self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    async def next(self) -> Piece | Outcome:
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        if isinstance(item, Outcome):
            self.finished = True
        return item

    def cancel(self) -> None:
        if self.request is not None:
            self.request.cancel()

    def outcome(self, completion: Completion) -> Outcome:
        waited = self.t_submit - self.t_arrival   # arrival to the generator
        return Outcome(completion, ttft_seconds=waited + completion.ttft_seconds,
                       queue_seconds=waited + completion.queue_seconds, pipeline=self.pipeline)


def calibration_lengths(n_ubatch: int, n_ctx: int) -> list[int]:
    """Prompt lengths the server calibrates at start-up: one per length bucket of pyturbo.policy (powers of two) from
    the shortest that pipelines (two ubatches) to the longest that fits a sequence."""
    n = 1 << max(0, (2 * n_ubatch - 1).bit_length())
    out = []
    while n < n_ctx:
        out.append(n)
        n *= 2
    return out


class Engine:
    def __init__(self, settings: ServerSettings, metrics):
        self.settings, self.metrics = settings, metrics
        self.state, self.reason, self.failed_endpoints = "loading", "the model is loading", []
        self.model: Model | None = None
        self.generator: BatchedGenerator | None = None
        self.template: ChatTemplate | None = None
        self.endpoints: list[str] = list(settings.rpc)
        self.pool = None                                  # --demo: the local workers
        self._model_lock = threading.RLock()              # the model's lifetime vs tokenizing on the event loop
        self._closed = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.created = int(time.time())
        metrics.slots_busy.set_function(lambda: self.n_busy)
        metrics.queue.set_function(lambda: self.n_waiting)

    # ---- loading --------------------------------------------------------------------------------------------------

    def load(self) -> None:
        """Load the model and the context of --parallel sequences (blocking), and calibrate. For --demo, (re)start
        the local workers first."""
        s = self.settings
        path = s.model
        if s.demo:
            from . import demo
            path = demo.model_path()
            self.pool = demo.restart_workers(self.pool, s.demo_workers)
            self.endpoints = self.pool.endpoints
        model = Model(path, rpc_servers=self.endpoints or None, devices=s.devices,
                      tensor_split=s.tensor_split if s.tensor_split is not None else ("even" if s.demo else None))
        try:
            # each slot attends over its own n_ctx cells only (llama-server's -c / -np split): another slot's long
            # prompt or kept prompt cache does not lengthen its attention
            ctx = model.context(n_ctx=s.n_ctx * s.parallel, n_seq=s.parallel, n_batch=s.n_batch, n_ubatch=s.n_ubatch,
                                n_threads=s.threads, kv_unified=False)
            generator = BatchedGenerator(ctx, n_ctx=s.n_ctx, max_gap_ms=s.max_gap_ms, owns_context=True)
            try:
                self._calibrate(generator)
                override = s.chat_template.read_text() if s.chat_template else None
                template = ChatTemplate.for_model(model, override, str(s.chat_template or "")) if model.has_vocab \
                    else None
            except BaseException:
                generator.close()
                raise
        except BaseException:
            model.close()
            raise
        with self._model_lock:
            self.model, self.generator, self.template = model, generator, template
            self.state, self.reason, self.failed_endpoints = "up", "", []
        self.metrics.up.set(1)
        log.info("model %s loaded on %s: %d sequences of %d tokens (%d KV cells), max gap %.0f ms; chat template: %s",
                 path, ", ".join(model.devices), s.parallel, s.n_ctx, s.parallel * s.n_ctx, s.max_gap_ms,
                 template.source if template else "none (the model has no vocabulary)")

    def _calibrate(self, generator: BatchedGenerator) -> None:
        """Measure both prefill paths on synthetic prompts before serving (bounded by --calibration-s), so that the
        first users' long prompts already take the faster path; measurements kept from earlier runs count
        (pyturbo.policy), so a later start mostly measures nothing."""
        s = self.settings
        if s.pipeline != "auto" or policy.env_override(os.environ) is not None or s.calibration_s <= 0:
            return
        t0 = time.perf_counter()
        done = generator.calibrate(calibration_lengths(s.n_ubatch, s.n_ctx), s.calibration_s)
        measured = "; ".join(f"{n} tokens: " + ", ".join(f"{path} {max(v):.0f}" for path, v in m.items() if v)
                             for n, m in done)
        log.info("calibrated the prefill paths in %.1f s (tok/s, best run: %s)%s", time.perf_counter() - t0,
                 measured or "nothing measured", "" if len(done) == len(calibration_lengths(s.n_ubatch, s.n_ctx))
                 else "; longer prompts calibrate as they come (--calibration-s bounds this)")

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def _unload(self) -> None:
        with self._model_lock:   # taken apart under the lock, closed outside it (the generator's thread may want it)
            model, generator = self.model, self.generator
            self.model = self.generator = None
        if generator is not None:
            generator.close()
        if model is not None:
            model.close()  # safe after a device failure

    def close(self) -> None:
        self._closed.set()
        self._unload()
        if self.pool is not None:
            self.pool.stop()

    # ---- prompts --------------------------------------------------------------------------------------------------

    def check_up(self) -> None:
        if self.state != "up":
            raise Unavailable(self.reason, self.failed_endpoints)

    def tokens_for(self, prompt) -> list[int]:
        """Token ids of a completion prompt (text with BOS and special tokens, or ids)."""
        with self._model_lock:
            self.check_up()
            return prompt_tokens(self.model, prompt)

    def chat_tokens(self, messages: list[dict]) -> tuple[list[int], list[str]]:
        """The chat prompt's tokens and the template's own stop strings."""
        with self._model_lock:
            self.check_up()
            if self.template is None:
                raise ValueError(f"{self.settings.model_id} has no tokenizer vocabulary: use /v1/completions with "
                                 f"token ids")
            return self.template.prompt_tokens(self.model, messages), list(self.template.stop)

    def tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        with self._model_lock:
            self.check_up()
            return self.model.tokenize(text, add_special=add_special, parse_special=parse_special)

    def detokenize(self, tokens: list[int]) -> str:
        with self._model_lock:
            self.check_up()
            return self.model.detokenize(tokens)

    def pieces(self, tokens: list[int]) -> list[str]:
        """Each token's text on its own (a piece of a UTF-8 character comes out replaced, as llama-server does)."""
        with self._model_lock:
            self.check_up()
            return [self.model.token_bytes(t).decode(errors="replace") for t in tokens]

    @property
    def n_slots(self) -> int:
        """Sequences (llama-server's slots): --parallel."""
        return self.settings.parallel

    @property
    def n_busy(self) -> int:
        generator = self.generator
        return generator.n_busy if generator is not None else 0

    @property
    def n_free(self) -> int:
        """Slots free now (a read-only view for /health; none while the model is not loaded)."""
        generator = self.generator
        return generator.n_free if generator is not None else 0

    @property
    def n_waiting(self) -> int:
        """Requests waiting for a slot."""
        generator = self.generator
        return generator.n_waiting if generator is not None else 0

    # ---- running --------------------------------------------------------------------------------------------------

    async def submit(self, job: Job, t_arrival: float) -> Run:
        """Hand the job to the generator (it waits there, in arrival order, for a free sequence). Raises
        PromptTooLong, Unavailable."""
        n_ctx = self.settings.n_ctx
        check_prompt(len(job.tokens), n_ctx, "start the server with a larger --n-ctx", error=PromptTooLong)
        with self._model_lock:
            self.check_up()
            generator = self.generator
        mode = job.pipeline or self.settings.pipeline
        max_tokens = min(job.max_tokens or self.settings.max_tokens or n_ctx, n_ctx - len(job.tokens))
        run = Run(self._loop, t_arrival, mode)
        try:
            run.request = generator.submit(
                job.tokens, max_tokens=max_tokens, stop=job.stop, sampling=job.sampling, pipeline=mode,
                cache_prompt=job.cache_prompt, ignore_eos=job.ignore_eos, min_tokens=job.min_tokens,
                logprobs=job.logprobs, listener=lambda item: self._deliver(run, item))
        except FATAL as e:
            raise self._device_failed(e) from None
        except ValueError:
            if generator.failed is not None or self.state != "up":   # closed by a failure meanwhile
                raise Unavailable(self.reason, self.failed_endpoints) from None
            raise
        return run

    def _deliver(self, run: Run, item) -> None:
        """On the generator's thread: a request's Piece, Completion or failure, to its HTTP handler."""
        if isinstance(item, Completion):
            item = run.outcome(item)
            self.metrics.record(item)
        elif isinstance(item, FATAL):
            item = self._device_failed(item)
        run.post(item)

    # ---- failure and recovery -------------------------------------------------------------------------------------

    def _device_failed(self, exc: BaseException) -> Unavailable:
        """Mark the model down (once), start the recovery, and return the error the request reports."""
        # probed outside the lock (tokenizing on the event loop takes it), and only while the model was up
        dead = [ep for ep in self.endpoints if not _reachable(ep)] if self.state == "up" else []
        with self._model_lock:
            if self.state == "up":
                named = dead or [ep for ep in self.endpoints if ep in str(exc)]
                how = ("the server restarts its local workers and reloads the model" if self.settings.demo else
                       f"the server reloads the model once every worker answers again (checked every "
                       f"{RETRY_SECONDS:.0f} s); restart the worker{'s' if len(named) != 1 else ''} to recover")
                self.failed_endpoints = named
                self.reason = (f"RPC worker {', '.join(named) or '(unknown)'} of the model failed ({exc}); {how}")
                self.state = "down"
                self.metrics.up.set(0)
                log.error("%s", self.reason)
                threading.Thread(target=self._recover, name="pyturbo-recover", daemon=True).start()
            return Unavailable(self.reason, self.failed_endpoints)

    def _recover(self) -> None:
        # the generator has failed every request it held; closing it ends its thread
        self._unload()
        while not self._closed.is_set():
            try:
                if not self.settings.demo:
                    for ep in self.endpoints:
                        check_reachable(ep, timeout=RETRY_SECONDS)
                self.load()
                self.metrics.reloads.inc()
                log.warning("recovered: the model is loaded again")
                return
            except (PyturboError, OSError) as e:
                with self._model_lock:
                    self.state = "down"
                    self.reason = f"{self.reason.split(' [still down:', 1)[0]} [still down: {e}]"
                self._closed.wait(RETRY_SECONDS)


def _reachable(endpoint: str) -> bool:
    try:
        check_reachable(endpoint, timeout=0.5)
        return True
    except WorkerError:
        return False

"""The model owner: loads the model (for --demo also its local RPC workers), keeps --parallel slots (one context
each, with its own prompt cache), queues requests in arrival order, runs each generation on a thread of its own,
and reloads the model after a device failure.

Concurrency: a request holds one slot from its prefill to its last token; further requests wait in arrival order.
The slots' native steps (a prefill, one decoded token) take turns on one lock, so several slots share the devices
token by token and a long prefill delays the others' tokens; nothing is interrupted silently.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ..errors import ContextDeadError, PyturboError, WorkerError
from ..generation import Completion, Generation, Piece, check_prompt, common_prefix, prompt_tokens
from ..model import Model, check_reachable
from ..sampling import SamplerSettings
from ..chat import ChatTemplate
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


@dataclass(eq=False)
class Slot:
    """llama-server's slot: one context (its own KV cache and prompt cache) serving one request at a time. Not the
    executor's slots (a ubatch in flight's scheduler: PrefillResult.slot_buffer_bytes, llama-turbo/turbo-slots.cpp)."""
    id: int
    ctx: object = None
    busy: bool = False


class Run:
    """One request on a slot. Its generation runs on a thread; next() hands over what it produces: `Piece`s, then
    the `Outcome`, or raises what failed it."""

    def __init__(self, loop, gen: Generation, slot: Slot, t_arrival: float, pipeline: str):
        self.gen, self.slot, self.t_arrival, self.pipeline = gen, slot, t_arrival, pipeline
        self.t_slot = time.perf_counter()
        self._loop = loop
        self._queue: asyncio.Queue = asyncio.Queue()
        self.finished = False

    def post(self, item) -> None:  # from the generation thread
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
        self.gen.cancel()

    def outcome(self) -> Outcome:
        gen = self.gen
        return Outcome(gen.result(), ttft_seconds=(gen.t_first or gen.t_end) - self.t_arrival,
                       queue_seconds=self.t_slot - self.t_arrival, pipeline=self.pipeline)


class Engine:
    def __init__(self, settings: ServerSettings, metrics):
        self.settings, self.metrics = settings, metrics
        self.state, self.reason, self.failed_endpoints = "loading", "the model is loading", []
        self.model: Model | None = None
        self.template: ChatTemplate | None = None
        self.endpoints: list[str] = list(settings.rpc)
        self.pool = None                                  # --demo: the local workers
        self.slots = [Slot(i) for i in range(settings.parallel)]
        self.step_lock = threading.Lock()                 # one native step at a time across slots
        self._model_lock = threading.RLock()              # the model's lifetime vs tokenizing on the event loop
        self._free: list[Slot] = []
        self._waiters: deque[asyncio.Future] = deque()
        self._runs: set[Run] = set()                      # generations running on their threads
        self._runs_lock = threading.Lock()
        self._closed = threading.Event()
        self._executor = ThreadPoolExecutor(max_workers=settings.parallel, thread_name_prefix="pyturbo-slot")
        self._loop: asyncio.AbstractEventLoop | None = None
        self.created = int(time.time())

    # ---- loading --------------------------------------------------------------------------------------------------

    def load(self) -> None:
        """Load the model and one context per slot (blocking). For --demo, (re)start the local workers first."""
        s = self.settings
        path = s.model
        if s.demo:
            from . import demo
            path = demo.model_path()
            self.pool = demo.restart_workers(self.pool, s.demo_workers)
            self.endpoints = self.pool.endpoints
        model = Model(path, rpc_servers=self.endpoints or None, devices=s.devices, host_tensors=s.host_tensors,
                      tensor_split=s.tensor_split if s.tensor_split is not None else ("even" if s.demo else None))
        try:
            contexts = [model.context(n_ctx=s.n_ctx, n_batch=s.n_batch, n_ubatch=s.n_ubatch, n_threads=s.threads)
                        for _ in self.slots]
            override = s.chat_template.read_text() if s.chat_template else None
            template = ChatTemplate.for_model(model, override, str(s.chat_template or "")) if model.has_vocab else None
        except BaseException:
            model.close()
            raise
        with self._model_lock:
            self.model, self.template = model, template
            for slot, ctx in zip(self.slots, contexts):
                slot.ctx = ctx
            self.state, self.reason, self.failed_endpoints = "up", "", []
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._reset_free)
        else:
            self._reset_free()
        self.metrics.up.set(1)
        log.info("model %s loaded on %s; chat template: %s", path, ", ".join(model.devices),
                 template.source if template else "none (the model has no vocabulary)")

    def _reset_free(self) -> None:  # on the event loop, after a (re)load: every slot not in use is free
        for slot in self.slots:
            if not slot.busy and slot not in self._free:
                self._give(slot)

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def _unload(self) -> None:
        with self._model_lock:
            model, self.model = self.model, None
            for slot in self.slots:
                slot.ctx = None
            if model is not None:
                model.close()  # closes the contexts first; safe after a device failure

    def close(self) -> None:
        self._closed.set()
        with self._runs_lock:
            for run in self._runs:
                run.cancel()
        self._executor.shutdown(wait=True, cancel_futures=True)
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
    def n_free(self) -> int:
        """Slots free now (a read-only view for /health)."""
        return len(self._free)

    @property
    def n_waiting(self) -> int:
        """Requests waiting for a slot."""
        return len(self._waiters)

    # ---- running --------------------------------------------------------------------------------------------------

    async def submit(self, job: Job, t_arrival: float) -> Run:
        """Wait (in arrival order) for a slot and start the job there. Raises PromptTooLong, Unavailable."""
        n_ctx = self.settings.n_ctx
        check_prompt(len(job.tokens), n_ctx, "start the server with a larger --n-ctx", error=PromptTooLong)
        slot = await self._acquire(job.tokens)
        try:
            mode = job.pipeline or self.settings.pipeline
            max_tokens = min(job.max_tokens or self.settings.max_tokens or n_ctx, n_ctx - len(job.tokens))
            gen = slot.ctx.stream(job.tokens, max_tokens=max_tokens, stop=job.stop, sampling=job.sampling,
                                  pipeline=mode, cache_prompt=job.cache_prompt, ignore_eos=job.ignore_eos,
                                  min_tokens=job.min_tokens, logprobs=job.logprobs, lock=self.step_lock)
            run = Run(self._loop, gen, slot, t_arrival, mode)
            with self._runs_lock:
                self._runs.add(run)
            self._executor.submit(self._work, run)
            return run
        except BaseException:
            self._release(slot)
            raise

    def _work(self, run: Run) -> None:
        try:
            for piece in run.gen:
                run.post(piece)
            outcome = run.outcome()
            self.metrics.record(outcome)
            run.post(outcome)
        except (ContextDeadError, WorkerError) as e:
            run.post(self._device_failed(e))
        except BaseException as e:  # handed to the request, which reports it
            run.post(e)
        finally:
            with self._runs_lock:
                self._runs.discard(run)
            self._loop.call_soon_threadsafe(self._release, run.slot)

    async def _acquire(self, tokens: list[int]) -> Slot:
        self.check_up()
        if self._free and not self._waiters:  # the free slot whose cache shares the longest prefix
            slot = max(self._free, key=lambda s: common_prefix(s.ctx.prompt_cache.tokens if s.ctx else [], tokens))
            self._free.remove(slot)
        else:
            fut = self._loop.create_future()
            self._waiters.append(fut)
            self.metrics.queue.set(len(self._waiters))
            try:
                slot = await fut
            except asyncio.CancelledError:  # the client left while waiting: pass on a slot it was just given
                if fut.done() and not fut.cancelled() and fut.exception() is None:
                    self._give(fut.result())
                raise
            finally:
                if fut in self._waiters:
                    self._waiters.remove(fut)
                self.metrics.queue.set(len(self._waiters))
        slot.busy = True
        self.metrics.slots_busy.inc()
        if self.state != "up":
            self._release(slot)
            raise Unavailable(self.reason, self.failed_endpoints)
        return slot

    def _release(self, slot: Slot) -> None:  # on the event loop
        self.metrics.slots_busy.dec()
        self._give(slot)

    def _give(self, slot: Slot) -> None:
        """To the first request still waiting (reserved for it: busy), else back to the free slots."""
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                slot.busy = True
                fut.set_result(slot)
                return
        slot.busy = False
        if slot not in self._free:
            self._free.append(slot)

    def _fail_waiters(self, error: Unavailable) -> None:  # on the event loop
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_exception(error)
        self.metrics.queue.set(0)

    # ---- failure and recovery -------------------------------------------------------------------------------------

    def _device_failed(self, exc: BaseException) -> Unavailable:
        """Mark the model down (once), start the recovery, and return the error the request reports."""
        dead = [ep for ep in self.endpoints if not _reachable(ep)]
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
                self._loop.call_soon_threadsafe(self._fail_waiters, Unavailable(self.reason, named))
                threading.Thread(target=self._recover, name="pyturbo-recover", daemon=True).start()
            return Unavailable(self.reason, self.failed_endpoints)

    def _recover(self) -> None:
        # the other running requests end at their next step (their contexts are dead): wait before freeing the model
        deadline = time.monotonic() + 60
        while self._runs and time.monotonic() < deadline and not self._closed.is_set():
            time.sleep(0.05)
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

"""Batched generation: several requests at once on the sequences of one context, as llama-server's slots are.

    with BatchedGenerator.open(model, n_seq=4, n_ctx=4096) as gen:        # 4 sequences of up to 4096 tokens each
        runs = [gen.submit(prompt, max_tokens=32, temperature=0) for prompt in prompts]
        for run in runs:                                                  # or iterate a run for its Pieces
            print(run.result().text)

One scheduler thread owns every native call on the context. Each round it (a) prefills at most one chunk of a
pending prompt, (b) takes ONE decode step for every sequence that is generating, all of them in one llama_decode
(`Context.decode_tokens`), samples each sequence's next token and hands out the pieces. Requests beyond the
sequences wait in arrival order.

Chunked prefill: while other sequences are generating, a prompt prefills in chunks, and between two chunks they take
their step, so none of them waits for a whole long prefill. A chunk is as long as fits in max_gap_ms (the bound on a
generating sequence's time between two tokens) at the prefill speed measured on this context (`ChunkPlanner`), but
never shorter than (stages + 1) ubatches, which keeps the pipeline efficient (so a gap can exceed a bound below that
chunk's time), and always a multiple of n_ubatch, so the ubatches are those of a whole-prompt prefill. With no
other sequence generating, a prompt prefills in one go (the fastest time to first token). A chunk prefilled while
others generate is not a measurement of its path alone: pipeline="auto" decides it from runs alone and does not
record it (policy.shared_devices).

What is bit-identical and what is not (greedy, tests/test_batching.py):
- a prompt prefilled in chunks with nothing in between equals the whole prompt prefilled at once, bit for bit
  (logits and KV cache): the same ubatches in the same cells;
- a sequence that shares the context with others, or takes its decode steps together with them, or whose prompt was
  chunked while others decoded (their new cells sit between its chunks' cells) differs from a context of its own by
  rounding only: other kernel shapes (results.SEQUENCE_BATCH_TOLERANCE), so greedy answers can part where the two
  most likely tokens were within that rounding.

Prompt cache per sequence: a request takes the free sequence whose cached tokens share the longest prefix with its
prompt (the least recently used one when none does), and only the rest is prefilled; where a busy sequence shares
more, its prefix is copied into the chosen one (the KV cells are shared, not recomputed). A cancelled request frees
its sequence's cells; a finished one leaves them as that sequence's cache. Kept cells cost the others some time:
llama.cpp's unified cache attends over the range of all used cells (with flash attention on the CPU a 1500-token
prefill beside another sequence's 6000 cells took about 1.4x as long); forget_prompt_caches() frees them.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import queue
import threading
import time
from concurrent.futures import Future
from typing import Callable, Iterator, Sequence

import numpy as np

from . import policy
from .batch_planning import DEFAULT_MAX_GAP_MS, ChunkPlanner, SequenceTable
from .errors import ContextDeadError, PrefillError, WorkerError
from .generation import (Answer, Completion, Piece, check_generation_options, check_prompt, penalty_history,
                         prompt_tokens)
from .results import PrefillResult
from .sampling import Sampler, SamplerSettings
from .timeline import Timeline

log = logging.getLogger("pyturbo")

# Failures after which the context cannot be used: every request ends with them, and the generator stops
FATAL = (ContextDeadError, WorkerError)


class BatchedGeneration:
    """One request on a `BatchedGenerator`: iterate it for its `Piece`s (once), or call result() for the
    `Completion`; cancel() from any thread. With a listener, each Piece, then the Completion (or the exception that
    failed the request) is handed to listener(item) on the scheduler thread instead (keep it short)."""

    def __init__(self, generator: "BatchedGenerator", prompt: list[int], answer: Answer, sampler: Sampler,
                 pipeline, cache_prompt: bool, listener: Callable | None, on_logits: Callable | None):
        self.generator, self.prompt_tokens, self.answer, self.sampler = generator, prompt, answer, sampler
        self.pipeline, self.cache_prompt = pipeline, cache_prompt
        self.listener, self.on_logits = listener, on_logits
        self.seq: int | None = None               # the sequence, once admitted
        self.n_cached = 0                         # prompt tokens reused from the cache
        self.n_in_cache = 0                       # prompt tokens in the sequence's KV cache so far
        self.prefill_chunks: list[PrefillResult] = []
        self.next_token: int | None = None        # sampled, to be decoded by the next step
        self.finish_reason: str | None = None
        self.t_submit = time.perf_counter()
        self.t_admitted = self.t_first = self.t_end = None
        self._items: queue.Queue = queue.Queue()
        self._done = threading.Event()
        self._cancelled = threading.Event()
        self._completion: Completion | None = None
        self._error: BaseException | None = None
        self._iterated = False

    # ---- the caller's side ----------------------------------------------------------------------------------------

    def cancel(self) -> None:
        """Stop the request from any thread: it ends with finish_reason "cancelled" and its sequence's KV cells are
        freed; a running prefill chunk of it is aborted (the cache as before that chunk)."""
        self._cancelled.set()
        self.generator.cancelled(self)

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def __iter__(self) -> Iterator[Piece]:
        if self.listener is not None:
            raise RuntimeError("this request hands its pieces to its listener")
        if self._iterated:
            raise RuntimeError("a BatchedGeneration can be iterated only once")
        self._iterated = True
        while True:
            item = self._items.get()
            if isinstance(item, BaseException):
                raise item
            if isinstance(item, Completion):
                return
            yield item

    def result(self, timeout: float | None = None) -> Completion:
        """The `Completion`, once the request has ended (waits for it); raises what failed it."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"the request did not end within {timeout} s")
        if self._error is not None:
            raise self._error
        return self._completion

    @property
    def prefilling(self) -> bool:
        return self.seq is not None and self.n_in_cache < len(self.prompt_tokens)

    @property
    def generating(self) -> bool:
        return self.next_token is not None and self.finish_reason is None

    # ---- the scheduler's side -------------------------------------------------------------------------------------

    def deliver(self, item) -> None:
        if self.listener is None:
            self._items.put(item)
            return
        try:
            self.listener(item)
        except Exception:  # a listener's bug must not stop the other requests
            log.exception("a batched generation's listener failed")

    def finish(self, reason: str) -> Completion:
        self.finish_reason = reason
        self.t_end = time.perf_counter()
        self.sampler.close()
        a = self.answer
        self._completion = Completion(
            text=a.text, tokens=list(a.tokens), finish_reason=reason, n_prompt=len(self.prompt_tokens),
            n_cached=self.n_cached, prefill=merged_prefill(self.prefill_chunks),
            ttft_seconds=(self.t_first or self.t_end) - self.t_submit, seconds=self.t_end - self.t_submit,
            stop_string=a.stop_string, logprobs=None if a.token_logprobs is None else list(a.token_logprobs),
            queue_seconds=(self.t_admitted or self.t_end) - self.t_submit)
        self._done.set()
        self.deliver(self._completion)
        return self._completion

    def fail(self, error: BaseException) -> None:
        self.finish_reason = "error"
        self.t_end = time.perf_counter()
        self.sampler.close()
        self._error = error
        self._done.set()
        self.deliver(error)


def merged_prefill(chunks: list[PrefillResult]) -> PrefillResult | None:
    """One PrefillResult for a prompt prefilled in chunks: their tokens and seconds summed, the path that prefilled
    most of the tokens, and how it was chunked in `decision`."""
    if len(chunks) <= 1:
        return chunks[0] if chunks else None
    by_path: dict[str, int] = {}
    for c in chunks:
        by_path[c.path] = by_path.get(c.path, 0) + c.n_tokens
    path = max(by_path, key=by_path.get)
    standard = [c for c in chunks if c.path == "standard"]
    return dataclasses.replace(
        chunks[-1], n_tokens=sum(c.n_tokens for c in chunks), seconds=sum(c.seconds for c in chunks), path=path,
        fallback_reason=standard[0].fallback_reason if path == "standard" and standard else "",
        decision=(f"chunked: {len(chunks)} chunks of up to {max(c.n_tokens for c in chunks)} tokens while other "
                  f"sequences generated ({by_path.get('pipelined', 0)} tokens pipelined); first chunk: "
                  f"{chunks[0].decision}"),
        n_ubatches=sum(c.n_ubatches for c in chunks), timeline=Timeline(), host_times={})


class BatchedGenerator:
    """Requests on the n_seq sequences of one context (see the module's docstring), each sequence holding up to
    n_ctx tokens (default: the context's cells split evenly, ctx.n_ctx // ctx.n_seq, so that every sequence can
    always reach its n_ctx). max_gap_ms bounds a generating sequence's time between two tokens while another prompt
    prefills (ChunkPlanner). Use as a context manager, or close(); open() also creates (and then closes) the context.
    """

    def __init__(self, ctx, *, n_ctx: int | None = None, max_gap_ms: float = DEFAULT_MAX_GAP_MS,
                 owns_context: bool = False):
        if n_ctx is None:
            n_ctx = ctx.n_ctx // ctx.n_seq
        if isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or not 0 < n_ctx * ctx.n_seq <= ctx.n_ctx:
            raise ValueError(f"n_ctx (tokens per sequence) must be an int from 1 to {ctx.n_ctx // ctx.n_seq} (the "
                             f"context's {ctx.n_ctx} cells over its {ctx.n_seq} sequences), not {n_ctx!r}")
        if isinstance(max_gap_ms, bool) or not isinstance(max_gap_ms, (int, float)) or not max_gap_ms > 0:
            raise ValueError(f"max_gap_ms must be a number > 0, not {max_gap_ms!r}")
        self.ctx, self.n_ctx, self.n_seq = ctx, n_ctx, ctx.n_seq
        self.max_gap_ms = float(max_gap_ms)
        self.planner = ChunkPlanner(ctx.n_ubatch, ctx.n_batch, len(ctx.model.devices), max_gap_ms / 1e3)
        self._owns_context = owns_context
        self._table = SequenceTable(ctx.n_seq)
        self._cond = threading.Condition()
        self._waiting: list[BatchedGeneration] = []    # arrival order
        self._active: list[BatchedGeneration] = []     # admitted: prefilling or generating, in admission order
        self._calls: list[tuple[Callable, Future]] = []
        self._in_prefill: BatchedGeneration | None = None
        self._cancel_seen = False
        self._closing = False
        self._failed: BaseException | None = None
        self.n_steps = self.n_step_tokens = 0          # decode steps taken, and the tokens they decoded
        self._thread = threading.Thread(target=self._loop, name="pyturbo-batching", daemon=True)
        self._thread.start()

    @classmethod
    def open(cls, model, *, n_seq: int, n_ctx: int = 4096, max_gap_ms: float = DEFAULT_MAX_GAP_MS,
             **context_options) -> "BatchedGenerator":
        """A generator on a new context of n_seq sequences of n_ctx tokens each (n_seq * n_ctx KV cells), with
        model.context()'s other options; close() closes the context."""
        ctx = model.context(n_ctx=n_seq * n_ctx, n_seq=n_seq, **context_options)
        try:
            return cls(ctx, n_ctx=n_ctx, max_gap_ms=max_gap_ms, owns_context=True)
        except BaseException:
            ctx.close()
            raise

    # ---- requests -------------------------------------------------------------------------------------------------

    def submit(self, prompt: str | Sequence[int], *, max_tokens: int = 16, stop: str | Sequence[str] = (),
               sampling: SamplerSettings | None = None, pipeline="auto", cache_prompt: bool = True,
               ignore_eos: bool = False, min_tokens: int = 0, logprobs: int | None = None,
               listener: Callable | None = None, on_logits: Callable | None = None,
               **settings) -> BatchedGeneration:
        """Queue a generation; the options are Context.stream()'s (max_tokens is capped where the sequence is full:
        finish_reason "length"). listener: see BatchedGeneration. on_logits(logits): called on the scheduler thread
        with the raw logits each token is drawn from (diagnostics, tests). Bad options raise here, before any work."""
        model = self.ctx.model
        sampling = SamplerSettings.from_call(sampling, settings)
        tokens = prompt_tokens(model, prompt)
        stop = check_generation_options(max_tokens, stop, ignore_eos, min_tokens, logprobs)
        check_prompt(len(tokens), self.n_ctx, "use a larger n_ctx per sequence")
        answer = Answer(model, stop, max_tokens, ignore_eos, min_tokens, logprobs)
        sampler = Sampler(model, sampling)
        try:
            sampler.accept(penalty_history(tokens, sampling))
            run = BatchedGeneration(self, tokens, answer, sampler, pipeline, cache_prompt, listener, on_logits)
            with self._cond:
                if self._failed is not None:
                    raise self._failed
                if self._closing:
                    raise ValueError("the batched generator is closed")
                self._waiting.append(run)
                self._cond.notify_all()
        except BaseException:
            sampler.close()
            raise
        return run

    def cancelled(self, run: BatchedGeneration) -> None:
        """A request was cancelled (BatchedGeneration.cancel): the scheduler ends it at its next round; a prefill
        chunk of it that is running is aborted."""
        with self._cond:
            self._cancel_seen = True
            self._cond.notify_all()
            aborting = self._in_prefill is run
        if aborting:
            threading.Thread(target=self._abort_prefill_of, args=(run,), name="pyturbo-cancel", daemon=True).start()

    def _abort_prefill_of(self, run: BatchedGeneration) -> None:
        # a prefill clears an abort asked for just before it starts: ask again while that chunk runs
        while self._in_prefill is run:
            self.ctx.request_abort()
            time.sleep(0.05)

    # ---- state, for status pages ------------------------------------------------------------------------------------

    @property
    def n_waiting(self) -> int:
        """Requests waiting for a sequence."""
        return len(self._waiting)

    @property
    def n_busy(self) -> int:
        """Sequences serving a request."""
        return len(self._active)

    @property
    def n_free(self) -> int:
        return self.n_seq - len(self._active)

    @property
    def failed(self) -> BaseException | None:
        """The failure that stopped the generator (a dead device), or None."""
        return self._failed

    # ---- running something on the scheduler thread ----------------------------------------------------------------

    def call(self, fn: Callable, timeout: float | None = None):
        """fn(ctx) on the scheduler thread between two rounds (the only thread that may use the context while the
        generator runs), and its value."""
        fut: Future = Future()
        with self._cond:
            if self._failed is not None:
                raise self._failed
            if self._closing or not self._thread.is_alive():
                raise ValueError("the batched generator is closed")
            self._calls.append((fn, fut))
            self._cond.notify_all()
        return fut.result(timeout)

    def calibrate(self, lengths: Sequence[int], max_seconds: float) -> list[tuple[int, dict]]:
        """Measure both prefill paths on synthetic prompts of these lengths (shortest first) while no request is
        active, so that pipeline="auto" takes the faster one for such prompts from the first request on
        (Context.calibrate, one warm run of each path), and the chunk planner knows this context's speed. A length
        whose estimated time would pass max_seconds is left out (with the longer ones): those calibrate as prompts
        come. Returns [(length, {path: [tok/s, ...]}), ...] for the lengths measured. Clears the prompt caches."""
        return self.call(lambda ctx: self._calibrate(ctx, list(lengths), max_seconds))

    def _calibrate(self, ctx, lengths: list[int], max_seconds: float) -> list[tuple[int, dict]]:
        if self._active:
            raise RuntimeError("calibrate() runs while no request is active")
        rng = np.random.default_rng(0)
        t0, last, done = time.perf_counter(), 0.0, []
        ctx.reset()
        self._table.forget_all()
        if lengths:
            # a context's first run of each path allocates (the pipeline's slot buffers) and auto decides a context's
            # first prefill from such first runs: made here, so that the first request's prefill is a warm run,
            # decided from warm measurements (those kept from earlier starts count, and then nothing else runs)
            warm = rng.integers(0, ctx.model.n_vocab, min(lengths)).astype(np.int32)
            for pipeline in ("force", "off"):
                ctx.prefill(warm, pipeline=pipeline)
                ctx.reset()
        for n in sorted(lengths):
            spent = time.perf_counter() - t0
            if spent + 2.2 * last > max_seconds:   # twice the tokens, and attention grows
                break
            t1 = time.perf_counter()
            tokens = rng.integers(0, ctx.model.n_vocab, n).astype(np.int32)
            measured = ctx.calibrate(tokens, runs=1)
            last = time.perf_counter() - t1
            for path, runs in measured.items():
                if runs:
                    self.planner.observe_prefill(n, n / float(np.median(runs)), path)
            done.append((n, measured))
        ctx.reset()
        return done

    def forget_prompt_caches(self) -> int:
        """Free the KV cells the free sequences keep as their prompt caches, and return how many. They cost the others
        a little: llama.cpp's unified cache attends over the range of all used cells (measured: a 4000-token prefill
        about 20% slower beside another sequence's 4000 cells, bench/results/2026-12-04-server-chunking.md)."""
        return self.call(self._forget_free_caches)

    def _forget_free_caches(self, ctx) -> int:
        freed = 0
        for seq, busy in enumerate(self._table.busy):
            if not busy and self._table.tokens[seq]:
                freed += len(self._table.tokens[seq])
                self._table.release(seq, keep_tokens=False)
                if not ctx.truncate(0, seq=seq):
                    raise PrefillError(f"sequence {seq} of the KV cache cannot be freed")
        return freed

    # ---- closing --------------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Cancel every request, stop the scheduler thread (a running prefill chunk is aborted) and, for open(), close
        the context. Safe to call twice."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            running = self._in_prefill
        if running is not None:
            self._abort_prefill_of(running)
        if self._thread is not threading.current_thread():
            self._thread.join()
        if self._owns_context:
            self.ctx.close()

    def __enter__(self) -> "BatchedGenerator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- the scheduler thread -------------------------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while self._wait_for_work():
                self._run_calls()
                self._end_cancelled()
                self._admit_waiting()
                self._prefill_chunk()
                self._decode_step()
        except FATAL as e:
            log.error("the batched generator stops: %s", e)
            self._fail_everything(e)
        except BaseException as e:  # a bug: no request may wait forever
            log.exception("the batched generator's scheduler failed")
            self._fail_everything(e)
        else:
            self._cancel_everything()

    def _wait_for_work(self) -> bool:
        with self._cond:
            while not self._closing and not (self._calls or self._active or self._cancel_seen
                                             or (self._waiting and self._table.n_free)):
                self._cond.wait()
            return not self._closing

    def _run_calls(self) -> None:
        with self._cond:
            calls, self._calls = self._calls, []
        for fn, fut in calls:
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(self.ctx))
            except FATAL as e:
                fut.set_exception(e)
                raise
            except BaseException as e:
                fut.set_exception(e)

    def _end_cancelled(self) -> None:
        with self._cond:
            if not self._cancel_seen:
                return
            self._cancel_seen = False
            gone = [r for r in self._waiting if r.cancelled]
            self._waiting = [r for r in self._waiting if not r.cancelled]
        for run in gone:
            run.finish("cancelled")
        for run in [r for r in self._active if r.cancelled]:
            self._end(run, "cancelled")

    def _admit_waiting(self) -> None:
        while True:
            with self._cond:
                if not self._waiting or not self._table.n_free:
                    return
                run = self._waiting.pop(0)
            self._admit(run)

    def _admit(self, run: BatchedGeneration) -> None:
        """Give the request a sequence holding the longest prefix of its prompt that the cache has (see
        SequenceTable.choose)."""
        seq, donor, n_keep = self._table.choose(run.prompt_tokens, run.cache_prompt)
        try:
            if donor is not None:
                self.ctx.copy_prefix(donor, seq, n_keep)
            elif not self.ctx.truncate(n_keep, seq=seq):
                n_keep = 0
                if not self.ctx.truncate(0, seq=seq):
                    raise PrefillError(f"sequence {seq} of the KV cache cannot be cleared")
        except FATAL as e:
            run.fail(e)   # in no list now: the others are failed by the scheduler
            raise
        except Exception as e:
            self._table.release(seq, keep_tokens=False)
            run.fail(e)
            return
        self._table.take(seq, run.prompt_tokens[:n_keep])
        run.seq, run.n_cached, run.n_in_cache = seq, n_keep, n_keep
        run.t_admitted = time.perf_counter()
        self._active.append(run)

    def _prefill_chunk(self) -> None:
        """(a) of a round: the next chunk of the first request whose prompt is not all in the cache yet."""
        run = next((r for r in self._active if r.prefilling), None)
        if run is None:
            return
        start = run.n_in_cache
        shared = any(r.generating for r in self._active)
        n = self.planner.chunk_tokens(len(run.prompt_tokens) - start, shared, start)
        tokens = run.prompt_tokens[start:start + n]
        with self._cond:
            if run.cancelled or self._closing:
                return
            self._in_prefill = run
        try:
            # between chunks the others take their steps: this chunk does not measure a path alone, so auto neither
            # records it nor measures with it (policy.shared_devices)
            with policy.shared_devices() if shared else contextlib.nullcontext():
                res = self.ctx.prefill(tokens, pipeline=run.pipeline, seq=run.seq)
        except KeyboardInterrupt:  # aborted (cancel or close): the cache is as before the chunk
            if run.cancelled or self._closing:
                return
            raise
        except FATAL:
            raise
        except Exception as e:  # the cache is as before the chunk
            self._fail(run, e)
            return
        finally:
            with self._cond:
                self._in_prefill = None
        run.prefill_chunks.append(res)
        # one line per prefill (chunk): which path took it and why, as llama-server logs a slot's prompt processing
        log.info("sequence %d: prefilled tokens %d-%d of %d in %.3f s (%.0f tok/s), %s%s (%s)", run.seq, start,
                 start + n, len(run.prompt_tokens), res.seconds, res.tokens_per_second, res.path,
                 f": {res.fallback_reason}" if res.fallback_reason else "", res.decision)
        run.n_in_cache += n
        self._table.extend(run.seq, tokens)
        self.planner.observe_prefill(n, res.seconds, res.path, res.n_stages, start)
        if not run.prefilling:
            self._sample(run, res.logits)

    def _decode_step(self) -> None:
        """(b) of a round: one decode step of every generating sequence, in one llama_decode, and their next
        tokens."""
        runs = [r for r in self._active if r.generating]
        if not runs:
            return
        t0 = time.perf_counter()
        try:
            logits = self.ctx.decode_tokens([r.next_token for r in runs], seqs=[r.seq for r in runs], logits="all")
        except FATAL:
            raise
        except Exception as e:  # the cache is as before the step
            for run in runs:
                self._fail(run, e)
            return
        self.n_steps += 1
        self.n_step_tokens += len(runs)
        for run, row in zip(runs, logits):
            self._table.extend(run.seq, [run.next_token])
            run.next_token = None
            self._sample(run, row)
        self.planner.observe_step(time.perf_counter() - t0)

    def _sample(self, run: BatchedGeneration, logits: np.ndarray) -> None:
        """Draw the request's next token from these logits and hand out its piece; end the request where the token
        ends it or its sequence is full."""
        try:
            if run.on_logits is not None:
                run.on_logits(logits)
            answer = run.answer
            token = run.sampler.sample(answer.drawable(logits))
            if run.t_first is None:
                run.t_first = time.perf_counter()
            piece = answer.take(token, logits)
        except FATAL:
            raise
        except Exception as e:
            self._fail(run, e)
            return
        if answer.finish_reason is None and len(self._table.tokens[run.seq]) >= self.n_ctx:
            answer.finish_reason = "length"   # no room to decode the token: it is the last
        if piece is not None:
            run.deliver(piece)
        if answer.finish_reason is None:
            run.next_token = token
            return
        tail = answer.tail()
        if tail is not None:
            run.deliver(tail)
        self._end(run, answer.finish_reason)

    def _end(self, run: BatchedGeneration, reason: str) -> None:
        """The request leaves its sequence: a finished one leaves its tokens there as the sequence's prompt cache, a
        cancelled one frees its cells."""
        self._active.remove(run)
        if reason == "cancelled":
            self._table.release(run.seq, keep_tokens=False)
            if not self.ctx.truncate(0, seq=run.seq):
                raise PrefillError(f"sequence {run.seq} of the KV cache cannot be freed")
        else:
            self._table.release(run.seq)
        run.finish(reason)

    def _fail(self, run: BatchedGeneration, error: BaseException) -> None:
        self._active.remove(run)
        self._table.release(run.seq)
        run.fail(error)

    def _fail_everything(self, error: BaseException) -> None:
        with self._cond:
            self._failed = error
            runs, self._waiting = self._waiting + self._active, []
            calls, self._calls = self._calls, []
        self._active = []
        for run in runs:
            run.fail(error)
        for _, fut in calls:
            if fut.set_running_or_notify_cancel():
                fut.set_exception(error)

    def _cancel_everything(self) -> None:
        with self._cond:
            runs, self._waiting = self._waiting + self._active, []
            calls, self._calls = self._calls, []
        self._active = []
        for run in runs:
            run.finish("cancelled")
        for _, fut in calls:
            if fut.set_running_or_notify_cancel():
                fut.set_exception(ValueError("the batched generator is closed"))

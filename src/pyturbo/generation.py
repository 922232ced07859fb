"""Text generation on a `Context`: the prompt cache, the sampling loop, stop strings and incremental detokenizing.

Used through `Context.stream()` and `Context.complete()`; see there.
"""
from __future__ import annotations

import codecs
import contextlib
import threading
import time
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from .context import fits
from .sampling import Sampler, SamplerSettings


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(np.asarray(a[:n], dtype=np.int64) != np.asarray(b[:n], dtype=np.int64))
    return int(diff[0]) if diff.size else n


def prompt_tokens(model, prompt: str | Sequence[int]) -> list[int]:
    """A prompt's token ids: text is tokenized with BOS and special tokens (chat templates write them as text), ids
    are checked against the vocabulary. The one tokenizing of a prompt (the server's too)."""
    if isinstance(prompt, str):
        return model.tokenize(prompt, add_special=True, parse_special=True)
    return [int(t) for t in model.check_tokens(prompt)]


def check_prompt(n_prompt: int, n_ctx: int, larger: str = "use a larger n_ctx", error=ValueError) -> None:
    """Refuse a prompt that is empty or leaves no room for its answer's first token (context.fits: the one rule)."""
    if n_prompt == 0:
        raise error("the prompt is empty: give at least one token")
    if not fits(n_prompt + 1, n_ctx):
        raise error(f"the prompt has {n_prompt} tokens but the context holds {n_ctx} (and needs room for the "
                    f"answer); shorten it or {larger}")


def prefill_cached(ctx, tokens: Sequence[int], pipeline=True, cache_prompt: bool = True):
    """Make the KV cache hold exactly `tokens` and return (PrefillResult of what was computed, tokens reused).

    The longest common prefix with what the cache holds is kept (llama-server's cache_prompt) and only the rest is
    prefilled, through the pipeline when it is long enough. At least the last token is always computed: its logits
    start the generation.
    """
    tokens = [int(t) for t in tokens]
    check_prompt(len(tokens), ctx.n_ctx)
    cache = ctx.prompt_cache
    known = cache.known(ctx.n_past)
    n_keep = min(common_prefix(known, tokens), len(tokens) - 1) if cache_prompt and known is not None else 0
    # cutting the cache only drops positions (no device is written to, so a dead worker shows in the prefill)
    if not ctx.truncate(n_keep):
        n_keep = 0
        ctx.reset()
    cache.set(tokens[:n_keep])
    result = ctx.prefill(tokens[n_keep:], pipeline=pipeline)
    cache.set(tokens)
    return result, n_keep


class StopStrings:
    """Finds stop strings in streamed text: text that could still become one is held back until it cannot."""

    def __init__(self, stop: Sequence[str]):
        self.stop = [s for s in stop if s]
        self.held = ""

    def push(self, text: str) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string ended the output)."""
        self.held += text
        hits = [i for i in (self.held.find(s) for s in self.stop) if i >= 0]
        if hits:
            out, self.held = self.held[:min(hits)], ""
            return out, True
        keep = max((k for s in self.stop for k in range(min(len(s) - 1, len(self.held)), 0, -1)
                    if self.held.endswith(s[:k])), default=0)
        out, self.held = self.held[:len(self.held) - keep], self.held[len(self.held) - keep:]
        return out, False

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


@dataclass(frozen=True)
class Piece:
    text: str
    token: int | None  # None for text flushed at the end


@dataclass(frozen=True)
class Completion:
    text: str
    tokens: list[int]
    finish_reason: str          # "stop" (end of generation or a stop string), "length", "cancelled", "error"
    n_prompt: int               # prompt tokens
    n_cached: int               # of which reused from the KV cache (not prefilled)
    prefill: object             # PrefillResult of the prefilled rest, or None when cancelled before it finished
    ttft_seconds: float         # call to first sampled token
    seconds: float              # call to end


class Generation:
    """One generation on a context: iterate it for `Piece`s as they are produced (once). The prompt is tokenized
    and checked at construction, so a bad request fails before any work. cancel() stops it from any thread within
    about a second, leaving the KV cache consistent; afterwards result() gives the `Completion`.

    lock: held around each native step, for several contexts of one model used from several threads.
    """

    def __init__(self, ctx, prompt: str | Sequence[int], *, max_tokens: int = 16, stop: str | Sequence[str] = (),
                 sampling: SamplerSettings | None = None, pipeline=True, cache_prompt: bool = True, lock=None):
        self.prompt_tokens = prompt_tokens(ctx.model, prompt)
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be an int >= 1, not {max_tokens!r}")
        stop = [stop] if isinstance(stop, str) else list(stop)
        if not all(isinstance(s, str) for s in stop):
            raise ValueError(f"stop must be a string or a list of strings, not {stop!r}")
        check_prompt(len(self.prompt_tokens), ctx.n_ctx)
        self.ctx, self.max_tokens, self.stop = ctx, max_tokens, stop
        self.settings = sampling or SamplerSettings()
        self.pipeline, self.cache_prompt = pipeline, cache_prompt
        self._lock = lock
        self._cancelled = threading.Event()
        self._busy = threading.Event()
        self._started = False
        self.tokens: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None
        self.n_cached = 0
        self.prefill = None
        self.t_start = self.t_first = self.t_end = None

    # ---- control --------------------------------------------------------------------------------------------------

    def cancel(self) -> None:
        """Stop the generation from any thread; a running prefill is aborted (the KV cache stays as before it)."""
        self._cancelled.set()
        threading.Thread(target=self._abort_while_busy, name="pyturbo-cancel", daemon=True).start()

    def _abort_while_busy(self) -> None:
        # pt_prefill clears an abort requested just before it starts, so repeat the request while a step runs
        # (bounded by that step's own duration)
        while self._busy.is_set():
            self.ctx.request_abort()
            time.sleep(0.05)

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def result(self) -> Completion:
        if self.finish_reason is None:
            raise RuntimeError("the generation has not finished: iterate it to the end first")
        return Completion(text=self.text, tokens=list(self.tokens), finish_reason=self.finish_reason,
                          n_prompt=len(self.prompt_tokens), n_cached=self.n_cached, prefill=self.prefill,
                          ttft_seconds=(self.t_first or self.t_end) - self.t_start, seconds=self.t_end - self.t_start)

    # ---- the loop -------------------------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Piece]:
        if self._started:
            raise RuntimeError("a Generation can be iterated only once")
        self._started = True
        self.t_start = time.perf_counter()
        try:
            yield from self._run()
        except (_Cancelled, GeneratorExit) as e:  # cancel(), or the consumer stopped iterating
            self.finish_reason = "cancelled"
            if isinstance(e, GeneratorExit):
                raise
        except BaseException:
            self.finish_reason = "error"
            raise
        finally:
            self.t_end = time.perf_counter()

    def _step(self, fn):
        self._busy.set()
        try:
            if self._cancelled.is_set():
                raise _Cancelled
            with self._lock if self._lock is not None else contextlib.nullcontext():
                return fn()
        except KeyboardInterrupt:
            if self._cancelled.is_set():
                raise _Cancelled from None
            raise
        finally:
            self._busy.clear()

    def _run(self) -> Iterator[Piece]:
        ctx, model = self.ctx, self.ctx.model
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        stops = StopStrings(self.stop)
        with Sampler(model, self.settings) as sampler:  # first: bad settings fail before the prefill
            res, self.n_cached = self._step(lambda: prefill_cached(ctx, self.prompt_tokens, self.pipeline,
                                                                   self.cache_prompt))
            self.prefill = res
            logits = res.logits
            last_n = self.settings.penalty_last_n  # the penalties look back over the prompt too, as llama-server's
            sampler.accept(self.prompt_tokens[max(0, len(self.prompt_tokens) - last_n):] if last_n else [])
            while True:
                if self._cancelled.is_set():
                    raise _Cancelled
                token = sampler.sample(logits)
                if self.t_first is None:
                    self.t_first = time.perf_counter()
                if model.has_vocab and model.is_eog(token):
                    self.finish_reason = "stop"
                    break
                self.tokens.append(token)
                # a model without a vocabulary (synthetic, token ids only) generates tokens without text
                text, hit = stops.push(decoder.decode(model.token_bytes(token) if model.has_vocab else b""))
                self.text += text
                yield Piece(text, token)  # text may be "" (part of a character, or held back by a stop string)
                if hit:
                    self.finish_reason = "stop"
                    return
                if len(self.tokens) >= self.max_tokens or ctx.n_past >= ctx.n_ctx:
                    self.finish_reason = "length"
                    break
                logits = self._step(lambda: self._decode(token))
        tail = stops.flush() + decoder.decode(b"", final=True)
        if tail:
            self.text += tail
            yield Piece(tail, None)

    def _decode(self, token: int) -> np.ndarray:
        logits = self.ctx.decode(token)
        self.ctx.prompt_cache.append(token)
        return logits


class _Cancelled(Exception):
    pass

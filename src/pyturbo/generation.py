"""Text generation on a `Context`: the prompt cache, the sampling loop, stop strings, incremental detokenizing,
end-of-generation control (ignore_eos, min_tokens) and log-probabilities.

Used through `Context.stream()` and `Context.complete()`; see there. What happens to each sampled token (the end of
generation, stop strings, text, logprobs, max_tokens) is `Answer`, shared with the batched generator
(pyturbo.batching), as are the prompt's checks (`check_generation_options`).
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


def penalty_history(prompt: Sequence[int], settings: SamplerSettings) -> Sequence[int]:
    """The prompt tokens a new sampler's penalties look back over (its last penalty_last_n), as llama-server's do."""
    last_n = settings.penalty_last_n
    return prompt[max(0, len(prompt) - last_n):] if last_n else []


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
    """Finds stop strings in streamed text: text that could still become one is held back until it cannot.
    `hit`: the stop string that ended the output (None until one does)."""

    def __init__(self, stop: Sequence[str]):
        self.stop = [s for s in stop if s]
        self.held = ""
        self.hit: str | None = None

    def push(self, text: str) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string ended the output)."""
        self.held += text
        hits = sorted((i, n, s) for n, s in enumerate(self.stop) if (i := self.held.find(s)) >= 0)
        if hits:
            at, _, self.hit = hits[0]
            out, self.held = self.held[:at], ""
            return out, True
        keep = max((k for s in self.stop for k in range(min(len(s) - 1, len(self.held)), 0, -1)
                    if self.held.endswith(s[:k])), default=0)
        out, self.held = self.held[:len(self.held) - keep], self.held[len(self.held) - keep:]
        return out, False

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability at a step: the log-softmax of the model's raw logits there, i.e. before the
    sampler chain (temperature, top_k/top_p/min_p, penalties, logit_bias and the end-of-generation mask of
    ignore_eos/min_tokens change what is drawn, not this), as llama-server's n_probs reports them."""
    token: int
    bytes: bytes       # what the token stands for (b"" for a model without a vocabulary)
    logprob: float

    @property
    def text(self) -> str:
        """The token's own text (a piece of a UTF-8 character comes out replaced)."""
        return self.bytes.decode(errors="replace")


@dataclass(frozen=True)
class TokenLogprobs:
    """A generated token (`chosen`) and the `top` most likely tokens at its step, most likely first (ties by id)."""
    chosen: TokenLogprob
    top: tuple[TokenLogprob, ...]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log-softmax of raw logits, in float64."""
    x = np.asarray(logits, dtype=np.float64)
    peak = np.max(x)
    return x - (peak + np.log(np.sum(np.exp(x - peak))))


def token_logprobs(model, logits: np.ndarray, token: int, n_top: int) -> TokenLogprobs:
    """The log-probability of `token` and of the n_top most likely tokens under `logits` (the raw logits of the step
    that drew it: see TokenLogprob)."""
    lp = log_softmax(logits)
    n_top = min(n_top, lp.size)
    top = np.argpartition(-lp, n_top - 1)[:n_top] if n_top else np.zeros(0, dtype=np.int64)
    top = top[np.lexsort((top, -lp[top]))]

    def entry(t) -> TokenLogprob:
        return TokenLogprob(int(t), model.token_bytes(int(t)) if model.has_vocab else b"", float(lp[t]))
    return TokenLogprobs(entry(token), tuple(entry(t) for t in top))


def without_end_of_generation(logits: np.ndarray, eog_tokens: Sequence[int]) -> np.ndarray:
    """A copy of logits in which no end-of-generation token can be drawn (their logit -inf, as llama.cpp's
    ignore_eos sets it)."""
    out = np.array(logits, dtype=np.float32)
    out[list(eog_tokens)] = -np.inf
    return out


@dataclass(frozen=True)
class Piece:
    text: str
    token: int | None  # None for text flushed at the end
    logprobs: TokenLogprobs | None = None  # the token's, when the generation was asked for them


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
    stop_string: str | None = None                  # the stop string that ended it, if one did
    logprobs: list[TokenLogprobs] | None = None     # one per token, when asked for (stream(logprobs=N))
    queue_seconds: float = 0.0  # of ttft_seconds, waiting for a sequence before any work (pyturbo.batching)


def check_generation_options(max_tokens, stop, ignore_eos, min_tokens, logprobs) -> list[str]:
    """ValueError for a bad option of a generation (stream() / the batched generator's submit()); the stop strings
    as a list."""
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be an int >= 1, not {max_tokens!r}")
    if not isinstance(ignore_eos, bool):
        raise ValueError(f"ignore_eos must be True or False, not {ignore_eos!r}")
    if isinstance(min_tokens, bool) or not isinstance(min_tokens, int) or min_tokens < 0:
        raise ValueError(f"min_tokens must be an int >= 0, not {min_tokens!r}")
    if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int) or logprobs < 0):
        raise ValueError(f"logprobs must be None or an int >= 0 (how many most likely tokens), not {logprobs!r}")
    stop = [stop] if isinstance(stop, str) else list(stop)
    if not all(isinstance(s, str) for s in stop):
        raise ValueError(f"stop must be a string or a list of strings, not {stop!r}")
    return stop


class Answer:
    """The answer of one generation as its tokens are sampled: what each token does to it (an end-of-generation token
    ends it; otherwise the token's text goes through the stop strings and the incremental UTF-8 decoder, its
    logprobs are taken, and max_tokens ends it), and the logits the sampler may draw from (ignore_eos, min_tokens).
    finish_reason is None until it ends ("stop": end of generation or a stop string, "length": max_tokens; the caller
    sets "length" itself when the context is full)."""

    def __init__(self, model, stop: Sequence[str], max_tokens: int, ignore_eos: bool = False, min_tokens: int = 0,
                 logprobs: int | None = None):
        self.model, self.max_tokens = model, max_tokens
        self.ignore_eos, self.min_tokens, self.n_top_logprobs = ignore_eos, min_tokens, logprobs
        self.tokens: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None
        self.stop_string: str | None = None
        self.token_logprobs: list[TokenLogprobs] | None = None if logprobs is None else []
        self._stops = StopStrings(stop)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def drawable(self, logits: np.ndarray) -> np.ndarray:
        """The logits the sampler draws from: without end-of-generation tokens under ignore_eos and before
        min_tokens (a model without a vocabulary has none)."""
        if self.model.has_vocab and (self.ignore_eos or len(self.tokens) < self.min_tokens):
            return without_end_of_generation(logits, self.model.eog_tokens)
        return logits

    def take(self, token: int, logits: np.ndarray) -> Piece | None:
        """A sampled token (drawn from these raw logits): the `Piece` to emit, or None when it ended the generation
        (an end-of-generation token is not part of the answer). The piece's text may be "" (part of a character, or
        held back by a stop string)."""
        model = self.model
        if model.has_vocab and model.is_eog(token):
            self.finish_reason = "stop"
            return None
        self.tokens.append(token)
        picked = None
        if self.token_logprobs is not None:
            picked = token_logprobs(model, logits, token, self.n_top_logprobs)
            self.token_logprobs.append(picked)
        # a model without a vocabulary (synthetic, token ids only) generates tokens without text
        text, hit = self._stops.push(self._decoder.decode(model.token_bytes(token) if model.has_vocab else b""))
        self.text += text
        if hit:
            self.finish_reason, self.stop_string = "stop", self._stops.hit
        elif len(self.tokens) >= self.max_tokens:
            self.finish_reason = "length"
        return Piece(text, token, picked)

    def tail(self) -> Piece | None:
        """Text still held (by a stop string that did not come, or an unfinished character) once the answer ended
        other than by a stop string: the last `Piece` (token None), or None."""
        if self.stop_string is not None:
            return None
        tail = self._stops.flush() + self._decoder.decode(b"", final=True)
        if not tail:
            return None
        self.text += tail
        return Piece(tail, None)


class Generation:
    """One generation on a context: iterate it for `Piece`s as they are produced (once). The prompt is tokenized
    and checked at construction, so a bad request fails before any work. cancel() stops it from any thread within
    about a second, leaving the KV cache consistent; afterwards result() gives the `Completion`.

    ignore_eos: end-of-generation tokens are never drawn (their logits -inf, llama.cpp's ignore_eos); min_tokens: the
    same for the first min_tokens tokens only. logprobs=N: each `Piece` (and the `Completion`) carries the drawn
    token's log-probability and the N most likely at its step (`TokenLogprobs`; log-softmax of the raw logits,
    before the sampler chain). lock: held around each native step, for several contexts of one model used from
    several threads.
    """

    def __init__(self, ctx, prompt: str | Sequence[int], *, max_tokens: int = 16, stop: str | Sequence[str] = (),
                 sampling: SamplerSettings | None = None, pipeline=True, cache_prompt: bool = True,
                 ignore_eos: bool = False, min_tokens: int = 0, logprobs: int | None = None, lock=None):
        self.prompt_tokens = prompt_tokens(ctx.model, prompt)
        stop = check_generation_options(max_tokens, stop, ignore_eos, min_tokens, logprobs)
        check_prompt(len(self.prompt_tokens), ctx.n_ctx)
        self.ctx, self.max_tokens, self.stop = ctx, max_tokens, stop
        self.settings = sampling or SamplerSettings()
        self.pipeline, self.cache_prompt = pipeline, cache_prompt
        self.answer = Answer(ctx.model, stop, max_tokens, ignore_eos, min_tokens, logprobs)
        self._lock = lock
        self._cancelled = threading.Event()
        self._busy = threading.Event()
        self._started = False
        self.finish_reason: str | None = None
        self.n_cached = 0
        self.prefill = None
        self.t_start = self.t_first = self.t_end = None

    @property
    def tokens(self) -> list[int]:
        return self.answer.tokens

    @property
    def text(self) -> str:
        return self.answer.text

    @property
    def stop_string(self) -> str | None:
        return self.answer.stop_string

    @property
    def token_logprobs(self) -> list[TokenLogprobs] | None:
        return self.answer.token_logprobs

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
                          ttft_seconds=(self.t_first or self.t_end) - self.t_start, seconds=self.t_end - self.t_start,
                          stop_string=self.stop_string,
                          logprobs=None if self.token_logprobs is None else list(self.token_logprobs))

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
        ctx, answer = self.ctx, self.answer
        with Sampler(ctx.model, self.settings) as sampler:  # first: bad settings fail before the prefill
            res, self.n_cached = self._step(lambda: prefill_cached(ctx, self.prompt_tokens, self.pipeline,
                                                                   self.cache_prompt))
            self.prefill = res
            logits = res.logits
            sampler.accept(penalty_history(self.prompt_tokens, self.settings))
            while True:
                if self._cancelled.is_set():
                    raise _Cancelled
                token = sampler.sample(answer.drawable(logits))
                if self.t_first is None:
                    self.t_first = time.perf_counter()
                piece = answer.take(token, logits)
                if answer.finish_reason is None and ctx.n_past >= ctx.n_ctx:
                    answer.finish_reason = "length"
                self.finish_reason = answer.finish_reason
                if piece is not None:
                    yield piece
                if answer.finish_reason is not None:
                    break
                logits = self._step(lambda: self._decode(token))
        tail = answer.tail()
        if tail is not None:
            yield tail

    def _decode(self, token: int) -> np.ndarray:
        logits = self.ctx.decode(token)
        self.ctx.prompt_cache.append(token)
        return logits


class _Cancelled(Exception):
    pass

"""Token sampling through llama.cpp's own sampler chain (src/capi/pt_generation.cpp), not re-implemented here.

    settings = SamplerSettings(temperature=0.7, top_p=0.9, seed=42)
    with Sampler(model, settings) as sampler:
        token = sampler.sample(result.logits)

The defaults are llama.cpp's (llama-server, llama-cpp-python): temperature 0.8, top_k 40, top_p 0.95, min_p 0.05,
no penalties. temperature=0 is greedy: the most likely token, as `Context.generate()` picks it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import numpy as np

from . import _native

RANDOM_SEED = 0xFFFFFFFF  # LLAMA_DEFAULT_SEED: llama.cpp draws a random seed
INT32_MIN, INT32_MAX = -2**31, 2**31 - 1


def _float_or_inf(x) -> bool:
    """Whether x is a float, an infinity or an int that a float holds (not NaN, not an int beyond float's range)."""
    try:
        return not math.isnan(float(x))
    except OverflowError:
        return False


@dataclass(frozen=True)
class SamplerSettings:
    temperature: float = 0.8
    top_k: int = 40                 # <= 0: off
    top_p: float = 0.95             # 1: off
    min_p: float = 0.05             # 0: off
    seed: int | None = None         # None: a random seed
    repeat_penalty: float = 1.0     # 1: off
    frequency_penalty: float = 0.0  # 0: off
    presence_penalty: float = 0.0   # 0: off
    penalty_last_n: int = 64        # how many recent tokens (prompt included) the penalties look at
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit

    def __post_init__(self):
        # every range is checked here, before C sees a value: an int beyond int32 would be an OverflowError there
        def number(name, lo, hi):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:  # NaN fails the range
                raise ValueError(f"{name} must be a number in [{lo}, {hi}], not {v!r}")

        def integer(name, lo, hi, note=""):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise ValueError(f"{name} must be an int in [{lo}, {hi}]{note}, not {v!r}")

        number("temperature", 0.0, 100.0)
        number("top_p", 0.0, 1.0)
        number("min_p", 0.0, 1.0)
        number("repeat_penalty", 1e-6, 100.0)
        number("frequency_penalty", -100.0, 100.0)
        number("presence_penalty", -100.0, 100.0)
        integer("top_k", INT32_MIN, INT32_MAX, " (<= 0: off)")
        integer("penalty_last_n", 0, INT32_MAX)
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed < RANDOM_SEED):
            raise ValueError(f"seed must be None or an int in [0, {RANDOM_SEED}), not {self.seed!r}")
        if not isinstance(self.logit_bias, dict):
            raise ValueError(f"logit_bias must be a dict of token id -> bias, not {type(self.logit_bias).__name__}")
        for tok, bias in self.logit_bias.items():
            if isinstance(tok, bool) or not isinstance(tok, int) or not 0 <= tok <= INT32_MAX \
                    or isinstance(bias, bool) or not isinstance(bias, (int, float)) or not _float_or_inf(bias):
                raise ValueError(f"logit_bias must map token ids (ints >= 0) to numbers (-inf and inf allowed), "
                                 f"not {tok!r}: {bias!r}")

    @classmethod
    def greedy(cls) -> "SamplerSettings":
        return cls(temperature=0.0)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_call(cls, sampling: "SamplerSettings | None", keywords: dict) -> "SamplerSettings":
        """The settings of a call that takes either sampling=SamplerSettings(...) or its fields as keywords."""
        if keywords:
            unknown = sorted(set(keywords) - set(cls.names()))
            if unknown:
                raise TypeError(f"unknown sampler setting(s) {unknown}; known: {list(cls.names())}")
            if sampling is not None:
                raise TypeError("pass either sampling=SamplerSettings(...) or its fields as keywords, not both")
            return cls(**keywords)
        return sampling or cls()


class Sampler(_native.NativeHandle):
    """A llama.cpp sampler chain for one generation: it keeps the history the penalties look at and the random
    state of its seed, so use a new one per request."""

    def __init__(self, model, settings: SamplerSettings | None = None):
        if model.closed:
            raise ValueError("the model is closed")
        self.settings = settings = settings or SamplerSettings()
        self.n_vocab = model.n_vocab
        for tok in settings.logit_bias:
            if not 0 <= tok < model.n_vocab:
                raise ValueError(f"logit_bias names token {tok}, outside the vocabulary [0, {model.n_vocab})")
        ffi, lib = _native.ffi(), _native.lib()
        params = ffi.new("pt_sampler_params *", {
            "temperature": settings.temperature, "top_k": settings.top_k, "top_p": settings.top_p,
            "min_p": settings.min_p, "seed": RANDOM_SEED if settings.seed is None else settings.seed,
            "penalty_last_n": settings.penalty_last_n, "repeat_penalty": settings.repeat_penalty,
            "frequency_penalty": settings.frequency_penalty, "presence_penalty": settings.presence_penalty})
        bias = ffi.new("pt_logit_bias[]", [{"token": t, "bias": max(min(float(b), 1e30), -1e30)}
                                           for t, b in settings.logit_bias.items()] or 1)
        ptr = lib.pt_sampler_new(model.handle, params, bias, len(settings.logit_bias))
        if ptr == ffi.NULL:
            raise ValueError(_native.last_error())
        self._ptr = ptr

    def sample(self, logits: np.ndarray) -> int:
        """A token id drawn from logits (float32 [n_vocab]); it joins the history."""
        ffi, lib = _native.ffi(), _native.lib()
        arr = np.ascontiguousarray(logits, dtype=np.float32)
        if arr.shape != (self.n_vocab,):
            raise ValueError(f"logits must have shape ({self.n_vocab},), not {arr.shape}")
        token = lib.pt_sampler_sample(self._live(), ffi.from_buffer("float[]", arr), arr.size)
        if token < 0:
            raise RuntimeError(_native.last_error())
        return token

    def accept(self, tokens) -> None:
        """Add tokens to the history without sampling (the prompt, so that the penalties see it)."""
        ffi, lib = _native.ffi(), _native.lib()
        arr = np.ascontiguousarray(tokens, dtype=np.int32)
        if arr.size and lib.pt_sampler_accept(self._live(), ffi.from_buffer("int32_t[]", arr), arr.size) != 0:
            raise RuntimeError(_native.last_error())

    def _live(self):
        if self._ptr is None:
            raise ValueError("the sampler is closed")
        return self._ptr

    def _free(self, ptr) -> None:
        _native.lib().pt_sampler_free(ptr)

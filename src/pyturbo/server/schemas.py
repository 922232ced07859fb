"""Request and response shapes of the OpenAI API and of llama-server's /completion, declared once: requests as
pydantic models (their validation errors become 400s), responses as the dicts they serialize to. Fields llama-server
adds (top_k, min_p, repeat_penalty, cache_prompt, ignore_eos, n_probs) are accepted on every route, min_tokens too,
and `pipeline` is pyturbo's own per-request override."""
from __future__ import annotations

import time
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from ..chat import new_id
from ..sampling import INT32_MAX, SamplerSettings
from .settings import pipeline_mode

MAX_STOP = 16
MAX_TOP_LOGPROBS = 20   # most likely tokens per step a request may ask for (OpenAI's top_logprobs bound)


def _not_bool(v):
    if isinstance(v, bool):  # pydantic would take true as 1
        raise ValueError(f"must be a number, not {str(v).lower()}")
    return v


Int = Annotated[int, BeforeValidator(_not_bool)]
Number = Annotated[float, BeforeValidator(_not_bool)]


def unsupported(what: str = "not supported by this server") -> PydanticCustomError:
    """A validation error of its own type: the app answers it with code "unsupported_parameter"."""
    return PydanticCustomError("unsupported", what)


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Generation(BaseModel):
    model_config = ConfigDict(extra="ignore")  # like the OpenAI API and llama-server: unknown fields are ignored

    model: str | None = None
    max_tokens: Int | None = Field(None, ge=1)
    temperature: Number | None = Field(None, ge=0, le=2)
    top_p: Number | None = Field(None, ge=0, le=1)
    top_k: Int | None = Field(None, ge=0, le=INT32_MAX)
    min_p: Number | None = Field(None, ge=0, le=1)
    seed: Int | None = Field(None, ge=0, lt=0xFFFFFFFF)
    stop: str | list[str] | None = Field(None, validate_default=True)
    repeat_penalty: Number | None = Field(None, gt=0, le=10)
    frequency_penalty: Number | None = Field(None, ge=-2, le=2)
    presence_penalty: Number | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = Field(None, validate_default=True)
    n: Int = Field(1, ge=1, le=1, description="only n=1 is supported")
    stream: bool = False
    stream_options: StreamOptions | None = None
    cache_prompt: bool = True
    ignore_eos: bool = False                                 # never draw an end-of-generation token
    min_tokens: Int = Field(0, ge=0, le=INT32_MAX)           # no end-of-generation token before this many
    n_probs: Int = Field(0, ge=0, le=MAX_TOP_LOGPROBS)       # llama-server's name: logprobs with this many top tokens
    pipeline: Literal["auto", "force", "off", "on"] | None = None   # "on": the old name of "force"
    user: str | None = None

    @field_validator("pipeline")
    @classmethod
    def _pipeline(cls, v):
        return None if v is None else pipeline_mode(v)

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v):
        out = {}
        for key, bias in (v or {}).items():
            if not key.lstrip("-").isdigit():
                raise ValueError(f"logit_bias keys must be token ids, not {key!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias values must be in [-100, 100], not {bias}")
            out[int(key)] = bias
        return out

    def sampler_settings(self) -> SamplerSettings:
        given = {name: getattr(self, name) for name in ("temperature", "top_p", "top_k", "min_p", "seed",
                                                        "repeat_penalty", "frequency_penalty", "presence_penalty")}
        return SamplerSettings(**{k: v for k, v in given.items() if v is not None}, logit_bias=dict(self.logit_bias))

    def top_logprobs_asked(self) -> int | None:
        """How many most likely tokens each generated token's logprobs list; None: no logprobs."""
        return self.n_probs or None


class CompletionRequest(_Generation):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    logprobs: Int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    # each check is on its field, so that its error names the field (an error of the whole model would be located
    # at the body, and read as a body that is not an object)
    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list) and v and isinstance(v[0], (str, list)):
            if len(v) != 1:
                raise unsupported(f"only one prompt per request is supported by this server, not {len(v)}: send "
                                  f"them as separate requests")
            return v[0]
        return v

    @field_validator("echo", "suffix", "best_of")
    @classmethod
    def _supported(cls, v, info):
        asked = {"echo": v is True, "suffix": bool(v), "best_of": v not in (None, 1)}[info.field_name]
        if asked:
            raise unsupported()
        return v

    def top_logprobs_asked(self) -> int | None:
        return self.logprobs if self.logprobs is not None else super().top_logprobs_asked()

class LlamaCompletionRequest(_Generation):
    """llama-server's POST /completion: a prompt (text, or token ids), n_predict (-1: until the context is full, or
    the server's --max-tokens), n_probs, return_tokens, and every sampling field of the OpenAI routes."""
    prompt: str | list[Int]
    n_predict: Int = Field(-1, ge=-1, le=INT32_MAX)
    return_tokens: bool = False

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list) and v and all(isinstance(x, str) for x in v):
            if len(v) != 1:
                raise unsupported(f"only one prompt per request is supported by this server, not {len(v)}: send "
                                  f"them as separate requests")
            return v[0]
        if not isinstance(v, (str, list)) or isinstance(v, list) and not all(
                isinstance(x, int) and not isinstance(x, bool) for x in v):
            raise ValueError("must be a string or a list of token ids (text and ids mixed are not supported)")
        return v

    @field_validator("n_predict")
    @classmethod
    def _n_predict(cls, v):
        if v == 0:
            raise unsupported("n_predict=0 (evaluate the prompt only) is not supported by this server: give -1 or a "
                              "count >= 1")
        return v

    @model_validator(mode="after")
    def _max(self):
        if self.n_predict > 0:
            self.max_tokens = self.n_predict
        return self


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_call_id, ...: passed to the template
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def for_template(self) -> dict:
        msg = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):
            msg["content"] = "".join(part.text for part in self.content)
        msg.setdefault("content", "")
        return msg


class ChatRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: Int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, v, info):
        if v is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return v

    def top_logprobs_asked(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else super().top_logprobs_asked()

    @model_validator(mode="after")
    def _max(self):
        self.max_tokens = self.max_tokens or self.max_completion_tokens
        return self


# ---- responses -------------------------------------------------------------------------------------------------------

def error_body(message: str, type: str = "invalid_request_error", code: str | None = None,
               param: str | None = None, **extra) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code, **extra}}


def usage(n_prompt: int, n_completion: int, n_cached: int) -> dict:
    return {"prompt_tokens": n_prompt, "completion_tokens": n_completion, "total_tokens": n_prompt + n_completion,
            "prompt_tokens_details": {"cached_tokens": n_cached}}


def timings(outcome) -> dict:
    """llama-server's `timings` fields, plus pyturbo's: time to first token, which prefill path ran and why."""
    c, p = outcome.completion, outcome.completion.prefill
    gen_s = max(c.seconds - c.ttft_seconds, 1e-9)
    return {"cache_n": c.n_cached, "prompt_n": p.n_tokens if p else 0,
            "prompt_ms": p.seconds * 1e3 if p else 0.0, "prompt_per_second": p.tokens_per_second if p else 0.0,
            "predicted_n": len(c.tokens), "predicted_ms": gen_s * 1e3,
            "predicted_per_second": max(len(c.tokens) - 1, 0) / gen_s,
            "ttft_ms": outcome.ttft_seconds * 1e3, "queue_ms": outcome.queue_seconds * 1e3,
            "prefill_path": p.path if p else "", "fallback_reason": p.fallback_reason if p else "",
            "prefill_decision": p.decision if p else "", "pipeline": outcome.pipeline}


def completion_response(rid: str, model: str, text: str, finish_reason: str | None, outcome=None, chat: bool = False,
                        chunk: bool = False, role: bool = False, logprobs: dict | None = None) -> dict:
    """A (chat) completion or one streamed chunk of it; with outcome, the usage and timings too; logprobs in the
    route's shape (answers.OpenAIAnswer)."""
    if chat:
        body = {"delta": ({"role": "assistant"} if role else {}) | ({"content": text} if text or role else {})} \
            if chunk else {"message": {"role": "assistant", "content": text}}
        body["logprobs"] = logprobs
        kind = "chat.completion.chunk" if chunk else "chat.completion"
    else:
        body, kind = {"text": text, "logprobs": logprobs}, "text_completion"
    out = {"id": rid, "object": kind, "created": int(time.time()), "model": model,
           "choices": [{"index": 0, **body, "finish_reason": finish_reason}]}
    if outcome is not None:
        c = outcome.completion
        out["usage"] = usage(c.n_prompt, len(c.tokens), c.n_cached)
        out["timings"] = timings(outcome)
    return out


def model_list(model_id: str, created: int, meta: dict) -> dict:
    return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created, "owned_by": "pyturbo",
                                        "meta": meta}]}


class TokenizeRequest(BaseModel):
    """llama-server's /tokenize: the token ids of `content` (special-token text such as "<|im_start|>" read as that
    token, as llama-server does; BOS only when add_special)."""
    content: str
    add_special: bool = False
    parse_special: bool = True
    with_pieces: bool = False


class DetokenizeRequest(BaseModel):
    """llama-server's /detokenize: the text of token ids."""
    tokens: list[Int]

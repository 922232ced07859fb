"""Chat without the server: chat templates and `Context.chat()`.

A `ChatTemplate` is the model's tokenizer.chat_template (or one given) rendered by Jinja2 in a sandbox, as
llama-cpp-python and Hugging Face do; a model without one gets ChatML, the stated fallback (also llama-server's).
`model.chat_template` is the model's; the server's chat route uses the same class.

`Context.chat(messages, ...)` answers the way llama-cpp-python's `create_chat_completion` does: an OpenAI-shaped
dict, or with stream=True an iterator of chunk dicts.

Jinja2 comes with the server extra (`pip install ".[server]"` in the pyturbo checkout); it is imported when a
template is compiled, so importing pyturbo does not need it.
"""
from __future__ import annotations

import time
import uuid
from datetime import datetime
from typing import Iterable, Iterator, Sequence

import numpy as np

# ChatML: what the fallback renders; its end marker is also a stop string, since a model that lacks the template
# lacks <|im_end|> as a special end-of-generation token too
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
CHATML_STOP = ["<|im_end|>"]
# JSON has no -inf: a logprob of -inf (a logit of -inf) is written as float32's lowest, as llama-server does
LOWEST_LOGPROB = float(np.finfo(np.float32).min)


class ChatTemplateError(ValueError):
    """The messages cannot be rendered (the template raised, or a message is malformed)."""


def _jinja2():
    try:
        import jinja2
        import jinja2.sandbox
    except ImportError as e:
        raise ImportError('chat templates need Jinja2, which comes with the server extra: run pip install ".[server]" '
                          'in the pyturbo checkout (the package index\'s "pyturbo" is another project)',
                          name="jinja2") from e
    return jinja2


class ChatTemplate:
    """A compiled chat template. source: where it came from, for /health and the logs; text: the Jinja2 source;
    stop: stop strings the template's format needs (ChatML's end marker for the fallback)."""

    def __init__(self, template: str, *, bos_token: str = "", eos_token: str = "", source: str = "",
                 stop: list[str] | None = None):
        jinja2 = _jinja2()
        self._template_error = jinja2.TemplateError

        def raise_exception(message: str):
            raise jinja2.TemplateError(message)

        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(template)
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"the chat template ({source or 'given'}) does not compile: {e}") from None
        self.bos_token, self.eos_token, self.source = bos_token, eos_token, source
        self.text = template  # the Jinja2 source itself (/props shows it, as llama-server does)
        self.stop = list(stop or [])

    @classmethod
    def for_model(cls, model, override: str | None = None, override_source: str = "") -> "ChatTemplate":
        """The override's text if given (the server's --chat-template), else the GGUF's, else ChatML."""
        bos = model.token_text(model.bos_id) if model.bos_id is not None else ""
        eos = model.token_text(model.eos_id) if model.eos_id is not None else ""
        if override is not None:
            return cls(override, bos_token=bos, eos_token=eos, source=override_source or "--chat-template")
        if model.gguf_chat_template:
            return cls(model.gguf_chat_template, bos_token=bos, eos_token=eos,
                       source="the model's tokenizer.chat_template")
        return cls(CHATML, bos_token=bos, eos_token=eos, source="ChatML (fallback: the model has no chat template)",
                   stop=CHATML_STOP)

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token, eos_token=self.eos_token)
        except self._template_error as e:
            raise ChatTemplateError(f"the chat template rejected the messages: {e}") from None
        except Exception as e:  # templates index and call things: a malformed message shows up as any error
            raise ChatTemplateError(f"the chat template failed on these messages ({type(e).__name__}: {e})") from None

    def prompt_tokens(self, model, messages: list[dict]) -> list[int]:
        """The rendered prompt as tokens. A template that writes BOS itself would double the one the tokenizer
        adds, so the rendered text loses a leading BOS when the tokenizer adds one (as llama.cpp does)."""
        text = self.render(messages)
        adds_bos = bool(model.tokenize("", add_special=True))
        if adds_bos and self.bos_token and text.startswith(self.bos_token):
            text = text[len(self.bos_token):]
        return model.tokenize(text, add_special=True, parse_special=True)


# ---- OpenAI's shapes ------------------------------------------------------------------------------------------------

def json_logprob(logprob: float) -> float:
    return max(float(logprob), LOWEST_LOGPROB)


def logprobs_content(entries: Iterable) -> list[dict]:
    """OpenAI's chat logprobs (choices[].logprobs.content) of `generation.TokenLogprobs`: per generated token its
    text, logprob, UTF-8 bytes and top_logprobs (most likely first), each also with the token `id`, as llama-server
    writes them (its /completion's completion_probabilities are the same list)."""
    def one(t) -> dict:
        return {"id": t.token, "token": t.text, "logprob": json_logprob(t.logprob), "bytes": list(t.bytes)}
    return [one(e.chosen) | {"top_logprobs": [one(t) for t in e.top]} for e in entries]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def _message_text(message: dict) -> dict:
    """A message as templates take it: content parts ([{"type": "text", "text": ...}]) joined, None as ""."""
    if not isinstance(message, dict):
        raise ChatTemplateError(f"each message must be a dict with 'role' and 'content', not {type(message).__name__}")
    content = message.get("content")
    if isinstance(content, list):
        content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return dict(message, content="" if content is None else content)


def chat_completion(ctx, messages: Sequence[dict], *, template: ChatTemplate | None = None, stream: bool = False,
                    max_tokens: int | None = None, stop: str | Sequence[str] = (), logprobs: bool = False,
                    top_logprobs: int | None = None, **kwargs) -> dict | Iterator[dict]:
    """Context.chat(): see there."""
    if top_logprobs is not None and not logprobs:
        raise ValueError("top_logprobs needs logprobs=True")
    template = template or ctx.model.chat_template
    tokens = template.prompt_tokens(ctx.model, [_message_text(m) for m in messages])
    stops = ([stop] if isinstance(stop, str) else list(stop)) + template.stop
    max_tokens = max_tokens if max_tokens is not None else max(1, ctx.n_ctx - len(tokens))  # until the context is full
    gen = ctx.stream(tokens, max_tokens=max_tokens, stop=stops, logprobs=(top_logprobs or 0) if logprobs else None,
                     **kwargs)
    head = {"id": new_id("chatcmpl"), "created": int(time.time()), "model": ctx.model.path.name}
    if stream:
        return _chat_chunks(gen, head)
    for _ in gen:
        pass
    c = gen.result()
    choice = {"index": 0, "message": {"role": "assistant", "content": c.text},
              "logprobs": {"content": logprobs_content(c.logprobs)} if c.logprobs is not None else None,
              "finish_reason": c.finish_reason}
    return head | {"object": "chat.completion", "choices": [choice], "usage": chat_usage(c)}


def chat_usage(completion) -> dict:
    n_prompt, n_completion = completion.n_prompt, len(completion.tokens)
    return {"prompt_tokens": n_prompt, "completion_tokens": n_completion, "total_tokens": n_prompt + n_completion,
            "prompt_tokens_details": {"cached_tokens": completion.n_cached}}


def _chat_chunks(gen, head: dict) -> Iterator[dict]:
    def chunk(delta: dict, logprobs=None, finish_reason=None) -> dict:
        return head | {"object": "chat.completion.chunk",
                       "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]}

    yield chunk({"role": "assistant", "content": ""})
    for piece in gen:
        if piece.text or piece.logprobs is not None:
            yield chunk({"content": piece.text} if piece.text else {},
                        {"content": logprobs_content([piece.logprobs])} if piece.logprobs is not None else None)
    yield chunk({}, finish_reason=gen.result().finish_reason)

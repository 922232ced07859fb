"""How a generation is written back, per route: OpenAI's chat and text completions, llama-server's /completion.

Each answer gives the whole response of a finished generation (`whole`), or the events of its stream: `opening()`,
one per `Piece` (`piece`), and `closing()` with the `Outcome`. An event is a JSON-able dict, or "[DONE]".
Logprobs are the library's (`generation.TokenLogprobs`: log-softmax of the raw logits, before the sampler chain).
"""
from __future__ import annotations

import codecs
from dataclasses import asdict

from ..chat import json_logprob, logprobs_content, new_id
from ..sampling import RANDOM_SEED, SamplerSettings
from .schemas import completion_response, timings

DONE = "[DONE]"


class LegacyLogprobs:
    """OpenAI's legacy completions logprobs (choices[].logprobs: tokens, token_logprobs, top_logprobs, text_offset),
    token by token across a stream. top_logprobs maps each of the most likely tokens' text to its logprob, plus the
    drawn token's (so up to N+1 entries, as OpenAI documents); text_offset is where each token's text starts in the
    completion's text (characters, from 0: the prompt is not echoed)."""

    def __init__(self):
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._offset = 0

    def of(self, entries) -> dict:
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for e in entries:
            out["tokens"].append(e.chosen.text)
            out["token_logprobs"].append(json_logprob(e.chosen.logprob))
            top = {t.text: json_logprob(t.logprob) for t in e.top}
            out["top_logprobs"].append(top | {e.chosen.text: json_logprob(e.chosen.logprob)})
            out["text_offset"].append(self._offset)
            self._offset += len(self._decoder.decode(e.chosen.bytes))
        return out


class OpenAIAnswer:
    """/v1/chat/completions (chat=True) and /v1/completions."""

    def __init__(self, model_id: str, chat: bool, include_usage: bool = False):
        self.model_id, self.chat, self.include_usage = model_id, chat, include_usage
        self.rid = new_id("chatcmpl" if chat else "cmpl")
        self._legacy = LegacyLogprobs()

    def _logprobs(self, entries) -> dict | None:
        if entries is None:
            return None
        return {"content": logprobs_content(entries)} if self.chat else self._legacy.of(entries)

    def whole(self, outcome) -> dict:
        c = outcome.completion
        return completion_response(self.rid, self.model_id, c.text, c.finish_reason, outcome, chat=self.chat,
                                   logprobs=self._logprobs(c.logprobs))

    def opening(self) -> list:
        return [completion_response(self.rid, self.model_id, "", None, chat=True, chunk=True, role=True)] \
            if self.chat else []

    def piece(self, piece) -> dict:
        logprobs = self._logprobs([piece.logprobs]) if piece.logprobs is not None else None
        return completion_response(self.rid, self.model_id, piece.text, None, chat=self.chat, chunk=True,
                                   logprobs=logprobs)

    def closing(self, outcome) -> list:
        final = completion_response(self.rid, self.model_id, "", outcome.completion.finish_reason, outcome,
                                    chat=self.chat, chunk=True)
        usage = final.pop("usage")
        events = [final]
        if self.include_usage:
            events.append(completion_response(self.rid, self.model_id, "", None, chat=self.chat, chunk=True)
                          | {"choices": [], "usage": usage})
        return events + [DONE]


def stop_type(completion) -> str:
    """llama-server's stop_type: "eos" (an end-of-generation token), "word" (a stop string), "limit" (n_predict or
    the context's end), "none" (it did not stop: cancelled)."""
    if completion.finish_reason == "stop":
        return "word" if completion.stop_string is not None else "eos"
    return "limit" if completion.finish_reason == "length" else "none"


def generation_settings(req, sampling: SamplerSettings, n_ctx: int, model_id: str) -> dict:
    """llama-server's generation_settings of a /completion request: what it ran with."""
    values = asdict(sampling)
    values["seed"] = RANDOM_SEED if sampling.seed is None else sampling.seed
    values["logit_bias"] = [[token, bias] for token, bias in sampling.logit_bias.items()]
    return values | {"n_ctx": n_ctx, "model": model_id, "n_predict": req.n_predict, "stop": req.stop,
                     "ignore_eos": req.ignore_eos, "min_tokens": req.min_tokens, "n_probs": req.n_probs,
                     "cache_prompt": req.cache_prompt, "stream": req.stream}


class LlamaAnswer:
    """llama-server's /completion: `content`, `stop`, tokens_predicted/tokens_evaluated, stop_type and stopping_word
    (the pinned llama-server's names) with stopped_eos/stopped_word/stopped_limit (older llama-servers' booleans, for
    clients written against them), completion_probabilities when n_probs asks. A stream is `data: {...}` events,
    one per token, the last with "stop": true and the totals, and no [DONE] (as llama-server)."""

    def __init__(self, model_id: str, n_prompt: int, prompt_text: str, settings: dict, return_tokens: bool):
        self.model_id, self.n_prompt, self.prompt_text = model_id, n_prompt, prompt_text
        self.settings, self.return_tokens = settings, return_tokens
        self.n_predicted = 0

    def whole(self, outcome) -> dict:
        return self._final(outcome, streamed=False)

    def opening(self) -> list:
        return []

    def piece(self, piece) -> dict:
        if piece.token is not None:
            self.n_predicted += 1
        body = {"index": 0, "content": piece.text, "tokens": [] if piece.token is None else [piece.token],
                "stop": False, "tokens_predicted": self.n_predicted, "tokens_evaluated": self.n_prompt}
        if piece.logprobs is not None:
            body["completion_probabilities"] = logprobs_content([piece.logprobs])
        return body

    def closing(self, outcome) -> list:
        return [self._final(outcome, streamed=True)]

    def _final(self, outcome, streamed: bool) -> dict:
        c = outcome.completion
        kind = stop_type(c)
        body = {"index": 0, "content": "" if streamed else c.text,
                "tokens": list(c.tokens) if self.return_tokens and not streamed else [], "stop": True,
                "model": self.model_id, "tokens_predicted": len(c.tokens), "tokens_evaluated": c.n_prompt,
                "generation_settings": self.settings, "prompt": self.prompt_text, "has_new_line": "\n" in c.text,
                "truncated": False, "stop_type": kind, "stopping_word": c.stop_string or "",
                "stopped_eos": kind == "eos", "stopped_word": kind == "word", "stopped_limit": kind == "limit",
                "tokens_cached": c.n_cached, "timings": timings(outcome)}
        if not streamed and c.logprobs is not None:
            body["completion_probabilities"] = logprobs_content(c.logprobs)
        return body

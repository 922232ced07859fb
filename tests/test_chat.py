"""Chat in the library, without the server: model.chat_template, ctx.chat() shaped like llama-cpp-python's
create_chat_completion, and the generation options beneath it (ignore_eos, min_tokens, logprobs, stop_string).

Nothing depends on what random weights sample: answers are compared with the library's own greedy path, the end of
generation is forced by a logit bias on EOS, and logprobs are checked against a recomputed log-softmax."""
from __future__ import annotations

import numpy as np
import pytest

import pyturbo
from pyturbo import synth
from pyturbo.chat import CHATML_STOP
from conftest import recomputed_logprobs, run_python

pytest.importorskip("jinja2", reason="chat templates need Jinja2: pip install '.[server]'")
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "tell me about the fox"}]
TEXT = "the quick brown fox jumps over the lazy dog"


@pytest.fixture(scope="module")
def templated_model(model_dir):
    shape = synth.ModelShape(**{**synth.PRESETS["tiny"].__dict__, "n_vocab": synth.tiny_vocab_size()})
    return synth.write_model(model_dir / "chat-lib.gguf", shape, seed=4, vocab="tiny",
                             chat_template=synth.TINY_CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def ctx(templated_model):
    with pyturbo.Model(templated_model, devices=[]) as model, \
            model.context(n_ctx=1024, n_batch=512, n_ubatch=64, n_threads=1) as ctx:
        yield ctx


@pytest.fixture(scope="module")
def certain_end(ctx) -> dict:
    """Greedy sampling with EOS made certain by a logit bias."""
    assert ctx.model.eog_tokens == (ctx.model.eos_id,)
    return {"temperature": 0, "logit_bias": {ctx.model.eos_id: 100.0}}


def test_model_chat_template_is_the_ggufs_else_chatml(ctx, vocab_model):
    template = ctx.model.chat_template
    assert template.text == synth.TINY_CHAT_TEMPLATE == ctx.model.gguf_chat_template
    assert template.source == "the model's tokenizer.chat_template" and template is ctx.model.chat_template
    assert template.render(MESSAGES[1:]) == "<s>user: tell me about the fox</s>\nassistant:"
    with pyturbo.Model(vocab_model, devices=[]) as plain:
        assert plain.gguf_chat_template is None
        fallback = plain.chat_template
        assert "ChatML" in fallback.source and fallback.stop == CHATML_STOP
        assert fallback.render(MESSAGES[1:]).endswith("<|im_start|>assistant\n")


def test_chat_answers_like_create_chat_completion(ctx):
    r = ctx.chat(MESSAGES, max_tokens=6, temperature=0, ignore_eos=True)
    prompt = ctx.model.chat_template.prompt_tokens(ctx.model, MESSAGES)
    want = ctx.complete(prompt, max_tokens=6, temperature=0, ignore_eos=True, cache_prompt=False)
    assert r["object"] == "chat.completion" and r["id"].startswith("chatcmpl-") and r["model"] == "chat-lib.gguf"
    choice = r["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": want.text} and choice["finish_reason"] == "length"
    assert choice["logprobs"] is None
    assert (r["usage"]["prompt_tokens"], r["usage"]["completion_tokens"]) == (len(prompt), 6)
    assert r["usage"]["total_tokens"] == len(prompt) + 6
    openai = pytest.importorskip("openai")
    assert openai.types.chat.ChatCompletion.model_validate(r).choices[0].message.content == want.text


def test_chat_stream_yields_chunks_of_the_same_answer(ctx):
    whole = ctx.chat(MESSAGES, max_tokens=8, temperature=0, ignore_eos=True, cache_prompt=False)
    chunks = list(ctx.chat(MESSAGES, max_tokens=8, temperature=0, ignore_eos=True, cache_prompt=False, stream=True))
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == \
        whole["choices"][0]["message"]["content"]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + ["length"]
    assert {c["id"] for c in chunks} == {chunks[0]["id"]} and all(c["object"] == "chat.completion.chunk" for c in chunks)
    openai = pytest.importorskip("openai")
    for c in chunks:
        openai.types.chat.ChatCompletionChunk.model_validate(c)


def test_chat_logprobs_and_options(ctx, certain_end):
    r = ctx.chat(MESSAGES, max_tokens=5, logprobs=True, top_logprobs=2, temperature=0, ignore_eos=True,
                 cache_prompt=False)
    content = r["choices"][0]["logprobs"]["content"]
    assert len(content) == r["usage"]["completion_tokens"] == 5
    assert all(e["logprob"] <= 0 and len(e["top_logprobs"]) == 2 for e in content)
    streamed = [e for c in ctx.chat(MESSAGES, max_tokens=5, logprobs=True, top_logprobs=2, temperature=0,
                                    ignore_eos=True, cache_prompt=False, stream=True)
                if c["choices"][0]["logprobs"] for e in c["choices"][0]["logprobs"]["content"]]
    assert streamed == content
    ended = ctx.chat(MESSAGES, max_tokens=9, min_tokens=3, **certain_end)
    assert ended["usage"]["completion_tokens"] == 3 and ended["choices"][0]["finish_reason"] == "stop"
    with pytest.raises(ValueError, match="top_logprobs needs logprobs"):
        ctx.chat(MESSAGES, top_logprobs=2)
    with pytest.raises(ValueError, match="each message must be a dict"):
        ctx.chat(["not a message"])


def test_ignore_eos_and_min_tokens_hold_off_the_end(ctx, certain_end):
    ended = ctx.complete(TEXT, max_tokens=10, **certain_end)
    assert ended.tokens == [] and ended.finish_reason == "stop" and ended.stop_string is None
    later = ctx.complete(TEXT, max_tokens=10, min_tokens=4, **certain_end)
    assert len(later.tokens) == 4 and later.finish_reason == "stop"
    never = ctx.complete(TEXT, max_tokens=10, ignore_eos=True, **certain_end)
    assert len(never.tokens) == 10 and never.finish_reason == "length" and ctx.model.eos_id not in never.tokens
    for bad in ({"min_tokens": -1}, {"min_tokens": True}, {"ignore_eos": "yes"}, {"logprobs": -1}, {"logprobs": 1.5}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ctx.stream(TEXT, **bad)


def test_stop_string_says_which_stop_ended_it(ctx):
    text = ctx.complete(TEXT, max_tokens=30, temperature=0, ignore_eos=True, cache_prompt=False).text
    stop = text[len(text) // 2:len(text) // 2 + 2]
    cut = ctx.complete(TEXT, max_tokens=30, temperature=0, ignore_eos=True, stop=["\x01zz", stop])
    assert (cut.text, cut.finish_reason, cut.stop_string) == (text[:text.index(stop)], "stop", stop)


def test_logprobs_are_the_log_softmax_of_the_raw_logits(ctx):
    """Sampled (not greedy), so the drawn token is not always the most likely: its logprob is still the
    recomputed log-softmax at its step, and the top list is that step's most likely tokens in order."""
    gen = ctx.stream(TEXT, max_tokens=12, temperature=1.0, top_k=0, min_p=0.0, seed=7, logprobs=4, cache_prompt=False)
    pieces = [p for p in gen if p.token is not None]
    c = gen.result()
    assert [p.logprobs for p in pieces] == c.logprobs and [e.chosen.token for e in c.logprobs] == c.tokens
    expected = recomputed_logprobs(ctx, ctx.model.tokenize(TEXT, parse_special=True), c.tokens)
    for e, lp in zip(c.logprobs, expected):
        assert e.chosen.logprob == pytest.approx(lp[e.chosen.token], abs=1e-12) and e.chosen.logprob <= 0
        assert [t.token for t in e.top] == [int(i) for i in np.argsort(-lp, kind="stable")[:4]]
        assert [t.logprob for t in e.top] == sorted((t.logprob for t in e.top), reverse=True)
        assert e.chosen.bytes == ctx.model.token_bytes(e.chosen.token)
    assert ctx.complete(TEXT, max_tokens=2).logprobs is None   # not asked: none computed


def test_without_jinja2_chat_says_how_to_install_it(templated_model):
    """The library imports without Jinja2; chat then raises an ImportError naming the server extra."""
    proc = run_python(f"""
        import sys
        import pyturbo, pyturbo.chat
        assert "jinja2" not in sys.modules, "importing pyturbo imported jinja2"
        sys.modules["jinja2"] = None     # as if it were not installed
        with pyturbo.Model({str(templated_model)!r}, devices=[]) as model, model.context(n_ctx=256) as ctx:
            try:
                ctx.chat([{{"role": "user", "content": "hi"}}], max_tokens=2)
            except ImportError as e:
                print("ImportError:", e)
    """)
    assert proc.returncode == 0, proc.stderr
    assert 'ImportError: chat templates need Jinja2' in proc.stdout and 'pip install ".[server]"' in proc.stdout

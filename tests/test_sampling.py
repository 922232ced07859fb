"""The text path of the library: llama.cpp's sampler chain, stream()/complete(), stop strings, the prompt cache."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

import pyturbo
from pyturbo import SamplerSettings, synth
from pyturbo.generation import StopStrings, common_prefix

TEXT = "the quick brown fox jumps over the lazy dog and then the model made the first long pipeline"


@pytest.fixture(scope="module")
def vocab_ctx(vocab_model):
    with pyturbo.Model(vocab_model, devices=[]) as model:
        with model.context(n_ctx=1024, n_batch=512, n_ubatch=64, n_threads=1) as ctx:
            yield ctx


def no_end(model) -> dict[int, float]:
    """A logit bias that rules out every end-of-generation token (and the few without text): when a random-weight
    model would end is a matter of its numerics (one CPU's kernels draw EOS after 131 tokens, another's never), so
    tests that need a generation of a known length, with text, use this instead of hoping."""
    bias = {t: float("-inf") for t in range(model.n_vocab) if model.is_eog(t) or not model.token_bytes(t)}
    assert model.eos_id in bias and len(bias) < model.n_vocab // 10
    return bias


def test_special_tokens_and_chat_template(vocab_model, model_dir):
    with pyturbo.Model(vocab_model, devices=[]) as model:
        assert (model.bos_id, model.eos_id) == (1, 2)
        assert model.token_text(model.bos_id) == "<s>" and model.token_bytes(model.bos_id) == b""
        assert model.is_eog(model.eos_id) and not model.is_eog(model.tokenize("fox", add_special=False)[0])
        assert model.gguf_chat_template is None
        assert model.tokenize("<s>fox", add_special=False, parse_special=True)[0] == model.bos_id
        assert model.bos_id not in model.tokenize("<s>fox", add_special=False)
    shape = synth.ModelShape(**{**synth.PRESETS["tiny"].__dict__, "n_vocab": synth.tiny_vocab_size(), "n_layer": 1})
    path = synth.write_model(model_dir / "templated.gguf", shape, vocab="tiny", chat_template=synth.TINY_CHAT_TEMPLATE)
    with pyturbo.Model(path, devices=[]) as model:
        assert model.gguf_chat_template == synth.TINY_CHAT_TEMPLATE


def test_greedy_matches_generate_token_for_token(vocab_ctx):
    vocab_ctx.reset()
    vocab_ctx.prefill(TEXT)
    expected = vocab_ctx.generate(40)
    eos = vocab_ctx.model.eos_id
    expected = expected[:expected.index(eos)] if eos in expected else expected
    got = vocab_ctx.complete(TEXT, max_tokens=40, temperature=0, cache_prompt=False)
    assert got.tokens == expected
    assert got.finish_reason == ("stop" if len(expected) < 40 else "length")
    # one candidate left after top-k: the draw must take it, whatever the temperature
    assert vocab_ctx.complete(TEXT, max_tokens=40, temperature=0.7, top_k=1, cache_prompt=False).tokens == expected


def test_seeded_sampling_is_reproducible_and_seed_dependent(vocab_ctx):
    def run(seed):
        return vocab_ctx.complete(TEXT, max_tokens=24, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=seed,
                                  logit_bias=no_end(vocab_ctx.model)).tokens

    first = run(7)
    assert len(first) == 24 and run(7) == first
    assert any(run(seed) != first for seed in (8, 9, 10))


def test_penalties_logit_bias_and_bad_settings(vocab_ctx):
    # a presence penalty of 100 makes every token seen in the last 64 (prompt included) lose to any unseen one
    got = vocab_ctx.complete("fox", max_tokens=30, temperature=0, presence_penalty=100.0, penalty_last_n=64,
                             logit_bias=no_end(vocab_ctx.model))
    prompt = vocab_ctx.model.tokenize("fox")
    assert len(got.tokens) == 30 and len(set(got.tokens)) == 30 and not set(got.tokens) & set(prompt)
    forced = vocab_ctx.model.tokenize("fox", add_special=False)[-1]
    assert set(vocab_ctx.complete("dog", max_tokens=5, temperature=0.9, logit_bias={forced: 100.0}).tokens) == {forced}
    with pytest.raises(ValueError, match="top_p"):
        SamplerSettings(top_p=1.5)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        vocab_ctx.complete("dog", max_tokens=2, logit_bias={10**6: 1.0})
    with pytest.raises(TypeError, match="unknown sampler setting"):
        vocab_ctx.stream("dog", temprature=0.5)


def test_streamed_text_is_the_detokenized_tokens(vocab_ctx):
    """Byte tokens split characters over several tokens: the streamed pieces must still add up to exactly the text
    of the tokens (incremental UTF-8, nothing lost or doubled at piece boundaries)."""
    gen = vocab_ctx.stream("hello", max_tokens=120, temperature=1.5, top_k=0, top_p=1.0, min_p=0.0, seed=3,
                           logit_bias=no_end(vocab_ctx.model))
    pieces = [p.text for p in gen]
    result = gen.result()
    assert "".join(pieces) == result.text == vocab_ctx.model.detokenize(result.tokens)
    assert len(result.tokens) == 120 and len(pieces) >= 120


def test_stop_strings():
    s = StopStrings(["END", "xyz"])
    assert s.push("abc E") == ("abc ", False)     # "E" might start END: held back
    assert s.push("N") == ("", False)
    assert s.push("Dmore") == ("", True)
    s = StopStrings(["END"])
    assert s.push("aEN") == ("a", False) and s.push("x") == ("ENx", False) and s.flush() == ""


def test_stop_string_ends_a_generation(vocab_ctx):
    bias = no_end(vocab_ctx.model)   # "stop" must come from the stop string
    full = vocab_ctx.complete(TEXT, max_tokens=30, temperature=0, logit_bias=bias).text
    stop = full[len(full) // 2:len(full) // 2 + 3]
    assert len(stop) == 3, f"30 tokens gave too little text to cut: {full!r}"
    got = vocab_ctx.complete(TEXT, max_tokens=30, temperature=0, stop=["\x00never", stop], logit_bias=bias)
    assert got.text == full[:full.index(stop)] and got.finish_reason == "stop"


def test_prompt_cache_reuses_the_prefix_and_matches_a_fresh_run(vocab_ctx):
    model = vocab_ctx.model
    first = vocab_ctx.complete(TEXT, max_tokens=8, temperature=0, cache_prompt=False, logit_bias=no_end(model))
    assert first.n_cached == 0 and first.prefill.n_tokens == first.n_prompt and len(first.tokens) == 8
    # the next turn as token ids: text would be retokenized, and whether the answer's first characters merge with
    # the prompt's last token depends on what random weights generate
    follow = model.tokenize(TEXT) + first.tokens + model.tokenize(" and the dog", add_special=False)
    cached = vocab_ctx.complete(follow, max_tokens=12, temperature=0)
    # the cache holds the prompt and the answer but its last token (generated, never decoded)
    assert cached.n_cached == first.n_prompt + len(first.tokens) - 1
    assert cached.prefill.n_tokens == cached.n_prompt - cached.n_cached
    fresh = vocab_ctx.complete(follow, max_tokens=12, temperature=0, cache_prompt=False)
    # same logits as a fresh prefill, up to the summation order of other batch shapes (a wrong position or KV slot
    # would differ by O(1), see test_basics)
    assert fresh.n_cached == 0
    np.testing.assert_allclose(cached.prefill.logits, fresh.prefill.logits, atol=1e-2)
    # a prompt that diverges early keeps only the common prefix
    other = vocab_ctx.complete("the quick brown cat", max_tokens=4, temperature=0)
    assert other.n_cached == common_prefix(follow, vocab_ctx.model.tokenize("the quick brown cat"))
    # the same prompt again: everything but the last token (its logits start the answer) comes from the cache
    again = vocab_ctx.complete("the quick brown cat", max_tokens=4, temperature=0)
    assert again.n_cached == again.n_prompt - 1 and again.prefill.n_tokens == 1
    np.testing.assert_allclose(again.prefill.logits, other.prefill.logits, atol=1e-2)
    # the library's own prefill() invalidates what the cache knows
    vocab_ctx.reset()
    vocab_ctx.prefill("the quick")
    assert vocab_ctx.complete("the quick brown cat", max_tokens=4, temperature=0).n_cached == 0


def test_cancel_from_another_thread_stops_within_a_second(vocab_ctx):
    # no end-of-generation token and no timer: the generation can only end by the cancel, which another thread sends
    # once the first piece has arrived, while the generation goes on (it would take 900 tokens otherwise)
    gen = vocab_ctx.stream(TEXT, max_tokens=900, temperature=1.0, seed=1, logit_bias=no_end(vocab_ctx.model))
    first_piece, cancelling = threading.Event(), threading.Event()
    cancelled_at = []

    def canceller():
        first_piece.wait(60)
        cancelling.set()
        cancelled_at.append(time.monotonic())
        gen.cancel()

    thread = threading.Thread(target=canceller)
    thread.start()
    n = 0
    for _ in gen:
        n += 1
        if n == 1:
            first_piece.set()
            assert cancelling.wait(60)   # the canceller runs now; this loop goes on generating meanwhile
    t_end = time.monotonic()
    thread.join(60)
    assert gen.result().finish_reason == "cancelled" and n < 900
    assert t_end - cancelled_at[0] < 1.5, "cancel() took effect only after %.2f s" % (t_end - cancelled_at[0])
    assert vocab_ctx.prompt_cache.known(vocab_ctx.n_past) is not None


def test_long_suffix_prefills_pipelined(vocab_model, rpc3):
    with pyturbo.Model(vocab_model, rpc_servers=rpc3.endpoints[:2]) as model:
        with model.context(n_ctx=2048, n_batch=1024, n_ubatch=32, n_threads=1) as ctx:
            base = ctx.complete(TEXT, max_tokens=2, temperature=0)
            long_follow = TEXT + base.text + " " + " ".join([TEXT] * 6)
            # forced: auto would pipeline only where it measured the pipeline faster on this machine
            res = ctx.complete(long_follow, max_tokens=2, temperature=0, pipeline="force")
            assert res.n_cached > 0 and res.prefill.n_tokens > 64 and res.prefill.path == "pipelined"
            ref = ctx.complete(long_follow, max_tokens=2, temperature=0, cache_prompt=False, pipeline=False)
            assert ref.prefill.path == "standard"
            np.testing.assert_allclose(ref.prefill.logits, res.prefill.logits, atol=1e-2)


def test_prompt_length_rule_at_the_boundary():
    """One rule for "too long" (context.fits): a prefill may fill the context exactly; a prompt to generate from
    needs one position more, for the answer's first token; the server's refusal is the same check."""
    from pyturbo.context import fits
    from pyturbo.generation import check_prompt
    from pyturbo.server.engine import PromptTooLong
    assert fits(8, 8) and not fits(9, 8) and fits(3, 8, n_past=5) and not fits(4, 8, n_past=5)
    check_prompt(7, 8)
    with pytest.raises(ValueError, match="the prompt has 8 tokens but the context holds 8"):
        check_prompt(8, 8)
    with pytest.raises(ValueError, match="empty"):
        check_prompt(0, 8)
    with pytest.raises(PromptTooLong, match="--n-ctx"):
        check_prompt(8, 8, "start the server with a larger --n-ctx", error=PromptTooLong)

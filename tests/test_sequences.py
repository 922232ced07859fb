"""Plain llama_decode calls (Context.decode_tokens), capture/replay around them (Context.capture), and several
sequences in one context (n_seq): the C API's pt_decode / pt_capture_* and the executor's llama_turbo_prefill."""
from __future__ import annotations

import numpy as np
import pytest

import pyturbo
from conftest import prompt
from pyturbo.results import SEQUENCE_BATCH_TOLERANCE
from pyturbo.errors import PrefillError

CTX = dict(n_ctx=512, n_batch=128, n_ubatch=32, n_threads=1)
CALLS = (100, 64, 57)   # uneven llama_decode calls: 4 + 2 + 2 ubatches of 32 (the last of each shorter)


def close_by_rounding(logits, exact):
    """Within SEQUENCE_BATCH_TOLERANCE of the largest logit, and the same top token unless the exact top two are
    closer than the difference itself (random weights may leave them that close)."""
    diff = float(np.max(np.abs(logits - exact)))
    top2 = np.sort(exact)[-2:]
    same_top = int(np.argmax(logits)) == int(np.argmax(exact)) or top2[1] - top2[0] <= 2 * diff
    return diff <= SEQUENCE_BATCH_TOLERANCE * max(1.0, float(np.abs(exact).max())) and same_top


def decode_in_calls(ctx, tokens, sizes=CALLS):
    """The prompt as a plain caller feeds it: one decode_tokens() call per size, the last token's logits each."""
    i0, out = 0, None
    for n in sizes:
        out = ctx.decode_tokens(tokens[i0:i0 + n], logits="last")
        i0 += n
    return out


@pytest.fixture(scope="module")
def model(tiny_model, rpc3):
    with pyturbo.Model(tiny_model, rpc_servers=rpc3.endpoints[:2]) as m:
        yield m


def test_capture_of_plain_decode_calls_replays_pipelined_with_the_plain_results(model):
    """A plain llama_decode caller's calls, captured and replayed pipelined, leave the logits and the KV cache that
    the same calls give uncaptured, bit for bit; the replay covers all their ubatches as one series."""
    toks = prompt(sum(CALLS), seed=3)
    with model.context(**CTX) as plain:
        decode_in_calls(plain, toks)
        plain_logits, plain_kv = plain.logits(), plain.kv_state()
    for mode, path in (("force", "pipelined"), ("off", "standard")):
        with model.context(**CTX) as ctx:
            with ctx.capture(pipeline=mode) as captured:
                assert decode_in_calls(ctx, toks) is None      # queued, nothing computed yet
            assert ctx.n_past == sum(CALLS)
            res = captured.result
            assert res.path == path, res.fallback_reason
            assert res.n_ubatches == 8 and res.n_tokens == sum(CALLS)
            assert np.array_equal(res.logits, plain_logits)
            assert ctx.kv_state() == plain_kv


def test_an_exception_inside_capture_drops_the_queued_calls(model):
    toks = prompt(150, seed=4)
    with model.context(**CTX) as ctx:
        with pytest.raises(RuntimeError, match="stop"):
            with ctx.capture() as captured:
                ctx.decode_tokens(toks[:100])
                raise RuntimeError("stop")
        assert captured.result is None and ctx.n_past == 0
        with ctx.capture() as captured:         # a new capture opens: the old one is closed
            ctx.decode_tokens(toks, logits="last")
        assert captured.result.path == "pipelined" and ctx.n_past == 150


def test_prefill_cuts_a_prompt_like_the_calls_of_n_batch(model):
    """prefill() hands the whole prompt to the executor, which cuts it into the n_batch calls a plain caller makes:
    the same results as those calls made one by one."""
    toks = prompt(300, seed=5)
    with model.context(**CTX) as plain:
        decode_in_calls(plain, toks, (128, 128, 44))
        expected, kv = plain.logits(), plain.kv_state()
    for mode in ("off", "force"):
        with model.context(**CTX) as ctx:
            res = ctx.prefill(toks, pipeline=mode)
            assert np.array_equal(res.logits, expected) and ctx.kv_state() == kv, mode


@pytest.mark.parametrize("kv_unified", [True, False])
def test_sequences_of_one_context_prefill_and_step_together(model, kv_unified):
    """Four sequences in one context (one KV cache): each prefills pipelined, then one decode_tokens() call takes a
    step of all four. Sequence 0's prefill equals a context of its own bit for bit (its cells are the first of an
    empty cache either way); the others' prefills and the step are within SEQUENCE_BATCH_TOLERANCE (other kernel
    shapes), and the step continues each sequence from its own cells."""
    prompts = [prompt(70 + 10 * s, seed=10 + s) for s in range(4)]
    alone = []
    for toks in prompts:
        with model.context(**CTX) as ctx:
            first = ctx.prefill(toks, pipeline="force").logits
            step = ctx.decode_tokens([int(np.argmax(first))])[0]
            alone.append((first, step))
    with model.context(**dict(CTX, n_ctx=2048), n_seq=4, kv_unified=kv_unified) as ctx:
        firsts = []
        for s, toks in enumerate(prompts):
            res = ctx.prefill(toks, pipeline="force", seq=s)
            assert res.path == "pipelined", res.fallback_reason
            firsts.append(res.logits)
            assert ctx.seq_len(s) == len(toks)
        assert np.array_equal(firsts[0], alone[0][0])
        if not kv_unified:   # each sequence prefilled into cells of its own, as alone: all of them bit for bit
            assert all(np.array_equal(first, a[0]) for first, a in zip(firsts, alone))
        nexts = [int(np.argmax(f)) for f in firsts]
        order = [2, 0, 3, 1]                  # any order: the rows come back in the caller's
        rows = ctx.decode_tokens([nexts[s] for s in order], seqs=order)
        assert rows.shape == (4, model.n_vocab)
        steps = {s: rows[k] for k, s in enumerate(order)}
        for s in range(4):
            assert close_by_rounding(firsts[s], alone[s][0]) and close_by_rounding(steps[s], alone[s][1]), s
            assert ctx.seq_len(s) == len(prompts[s]) + 1



@pytest.mark.parametrize("kv_unified", [True, False])
def test_copy_prefix_shares_a_prompt_between_sequences(model, kv_unified):
    """Unified: sequence 1 shares sequence 0's cells; split: they are copied into sequence 1's own (llama.cpp copies
    whole streams only; the tail is dropped after). Either way sequence 1 then continues as if it had prefilled the
    prefix itself, and sequence 0 keeps all of its own."""
    toks = prompt(120, seed=20)
    with model.context(**dict(CTX, n_ctx=1024), n_seq=2, kv_unified=kv_unified) as ctx:
        ctx.prefill(toks[:100], seq=0)
        ctx.copy_prefix(0, 1, 80)
        assert ctx.seq_len(1) == 80
        shared = ctx.prefill(toks[80:], seq=1, pipeline="off").logits
        assert ctx.seq_len(0) == 100 and ctx.seq_len(1) == 120
        with pytest.raises(PrefillError, match="fewer than"):
            ctx.copy_prefix(0, 1, 101)
    with model.context(**CTX) as alone:
        assert np.array_equal(alone.prefill(toks, pipeline="off").logits, shared)


def test_bad_sequences_are_refused_before_c(model):
    with model.context(**CTX, n_seq=2) as ctx:
        for bad in (2, -1, True, 1.0):
            with pytest.raises(ValueError, match="seq must be"):
                ctx.prefill([1, 2, 3], seq=bad)
        with pytest.raises(ValueError, match="one sequence per token"):
            ctx.decode_tokens([1, 2], seqs=[0])
        with pytest.raises(ValueError, match="n_seq"):
            model.context(**CTX, n_seq=0)
        with pytest.raises(ValueError, match="multiple of n_seq"):
            model.context(**dict(CTX, n_ctx=513), n_seq=2, kv_unified=False)
        with pytest.raises(ValueError, match="kv_unified"):
            model.context(**CTX, kv_unified=1)
        with pytest.raises(ValueError, match="capture"):
            with ctx.capture(pipeline="auto"):
                pass

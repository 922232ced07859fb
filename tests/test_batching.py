"""The batched generator (pyturbo.batching): several requests on the sequences of one context, decode steps taken
together, long prompts prefilled in chunks between them, the prompt cache per sequence, cancellation."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

import pyturbo
from conftest import prompt
from pyturbo.batch_planning import ChunkPlanner, SequenceTable
from pyturbo.batching import BatchedGenerator
from test_sequences import close_by_rounding

CTX = dict(n_batch=256, n_ubatch=32, n_threads=1)


@pytest.fixture(scope="module")
def model(tiny_model, rpc3):
    with pyturbo.Model(tiny_model, rpc_servers=rpc3.endpoints[:2]) as m:
        yield m


def greedy_alone(model, tokens, n: int) -> tuple[list[int], list[np.ndarray]]:
    """n greedy tokens in a context of its own, and the logits each was drawn from."""
    with model.context(n_ctx=1024, **CTX) as ctx:
        logits = [ctx.prefill(tokens, pipeline="off").logits]
        out = []
        while True:
            out.append(int(np.argmax(logits[-1])))
            if len(out) == n:
                return out, logits
            logits.append(ctx.decode_tokens([out[-1]])[0])


def agree_until_a_tie(tokens, logits, alone_tokens, alone_logits) -> int | None:
    """Every step's logits close by rounding to the alone run's, and the same tokens until a step where the alone
    run's two most likely tokens were within the difference measured there (random weights may tie). Returns that
    step, or None when all tokens agree."""
    assert len(tokens) == len(logits) == len(alone_tokens) == len(alone_logits)
    for i, (tok, row, tok_alone, row_alone) in enumerate(zip(tokens, logits, alone_tokens, alone_logits)):
        assert close_by_rounding(row, row_alone), f"step {i}: {np.abs(row - row_alone).max()}"
        if tok != tok_alone:
            top2 = np.sort(row_alone)[-2:]
            assert top2[1] - top2[0] <= 2 * np.abs(row - row_alone).max(), f"step {i}: parted without a tie"
            return i
    return None


# ---- without devices ----------------------------------------------------------------------------------------------

def test_chunk_planner_fits_the_bound_in_whole_ubatches():
    planner = ChunkPlanner(n_ubatch=32, n_batch=256, n_stages=3, max_gap_s=0.5)
    assert planner.min_tokens == 4 * 32
    assert planner.chunk_tokens(5000, others_generating=False) == 5000     # nobody waits: all at once
    assert planner.chunk_tokens(5000, others_generating=True) == 128      # nothing measured yet: the least
    planner.observe_prefill(1024, 1.0, "pipelined", 3)                     # 32 ubatches: 34 units, middle at 512
    planner.observe_step(0.02)
    budget = 0.85 * 0.5 - 0.02
    n = planner.chunk_tokens(5000, True)
    assert n % 32 == 0 and planner.predicted_seconds(n, 0) <= budget < planner.predicted_seconds(n + 32, 0)
    # one position measured: beyond it a unit is taken to grow in proportion to the position
    assert planner.unit_seconds("pipelined", 1024) == pytest.approx(2 / 34)
    later = planner.chunk_tokens(5000, True, n_past=3000)
    assert 128 <= later < n
    # two positions: a + b * P through them
    planner.observe_prefill(1024, 2.0, "pipelined", 3, n_past=1024)       # middle at 1536
    assert planner.unit_seconds("pipelined", 2560) == pytest.approx(3 / 34)
    assert planner.chunk_tokens(100, True) == 100
    planner.observe_prefill(1024, 100.0, "standard")                       # slow: never below the least
    assert planner.chunk_tokens(5000, True) == 128
    odd = ChunkPlanner(n_ubatch=32, n_batch=100, n_stages=2, max_gap_s=0.5)
    assert odd.granule == 100 and odd.min_tokens == 100                    # calls of n_batch cut the ubatches


def test_sequence_table_picks_the_longest_cached_prefix():
    table = SequenceTable(3)
    table.take(0, [1, 2, 3, 4])
    table.release(0)
    table.take(1, [1, 2, 9])
    table.release(1)
    assert table.choose([1, 2, 3, 4, 5], cache_prompt=True) == (0, None, 4)
    assert table.choose([1, 2, 3, 4], cache_prompt=True) == (0, None, 3)      # the last token is always computed
    assert table.choose([7, 7], cache_prompt=True) == (2, None, 0)            # no match: the least recently used
    assert table.choose([1, 2, 3, 4, 5], cache_prompt=False) == (2, None, 0)
    table.take(0, [1, 2, 3, 4, 5, 6])                                         # busy, and it shares more: copied
    assert table.choose([1, 2, 3, 4, 5, 8], cache_prompt=True) == (1, 0, 5)


# ---- on a model -----------------------------------------------------------------------------------------------------

def test_chunked_prefill_equals_the_whole_prompt_bit_for_bit(model):
    """Chunks on ubatch boundaries with nothing in between: the same ubatches in the same cells as the whole prompt,
    so the same logits and KV cache, on either path."""
    toks = prompt(1000, seed=3)
    kw = dict(CTX, n_ctx=2048, n_seq=2)
    with model.context(**kw) as ctx:
        whole = ctx.prefill(toks, pipeline="force", seq=1).logits
        whole_kv = ctx.kv_state(seq=1)
    for mode in ("force", "off"):
        with model.context(**kw) as ctx:
            i0 = 0
            for n in (128, 160, 320, 64, 328):
                res = ctx.prefill(toks[i0:i0 + n], pipeline=mode, seq=1)
                i0 += n
            assert np.array_equal(res.logits, whole) and ctx.kv_state(seq=1) == whole_kv, mode


def test_four_greedy_sequences_decode_together_as_each_alone(model):
    prompts = [prompt(40 + 13 * s, seed=30 + s) for s in range(4)]
    n = 24
    alone = [greedy_alone(model, p, n) for p in prompts]
    seen = [[] for _ in prompts]
    with BatchedGenerator.open(model, n_seq=4, n_ctx=256, **CTX) as gen:
        runs = [gen.submit(p, max_tokens=n, temperature=0, on_logits=seen[s].append) for s, p in enumerate(prompts)]
        done = [r.result(120) for r in runs]
        assert gen.n_step_tokens / gen.n_steps > 3     # the sequences took their steps together
    for s in range(4):
        assert done[s].finish_reason == "length" and len(done[s].tokens) == n
        agree_until_a_tie(done[s].tokens, seen[s], *alone[s])


def test_a_long_prompt_keeps_the_streams_gaps_under_the_bound(model):
    """Three streams generate while a long prompt arrives: it prefills in chunks (96 tokens at least: 3 ubatches
    over 2 stages), and between chunks the streams take their steps, so the time between two of a stream's pieces
    stays under the bound (with a generous margin: a noisy 2-core machine), while its prefill took several times the
    bound. The chunked prompt's first token is drawn from logits within rounding of a whole prefill's."""
    bound_ms, long_prompt = 400, prompt(2500, seed=40)
    arrivals = [[] for _ in range(3)]
    with BatchedGenerator.open(model, n_seq=4, n_ctx=4096, max_gap_ms=bound_ms, **CTX) as gen:
        streams = [gen.submit(prompt(20, seed=41 + i), max_tokens=4000, temperature=0,
                              listener=lambda item, i=i: arrivals[i].append(time.perf_counter()))
                   for i in range(3)]
        while min(map(len, arrivals)) < 3:
            time.sleep(0.01)
        t_sent = time.perf_counter()
        first = []
        long = gen.submit(long_prompt, max_tokens=1, temperature=0, pipeline="force", on_logits=first.append)
        chunked = long.result(300)
        t_first = time.perf_counter()
        for s in streams:
            s.cancel()
        whole = gen.submit(long_prompt, max_tokens=1, temperature=0, pipeline="force", cache_prompt=False).result(300)
    assert len(long.prefill_chunks) >= 3 and chunked.prefill.n_tokens == 2500, chunked.prefill.decision
    assert all(c.n_tokens % 32 == 0 for c in long.prefill_chunks[:-1])
    gaps = [b - a for times in arrivals for a, b in zip(times, times[1:]) if b > t_sent and a < t_first]
    assert len(gaps) >= 3 * (len(long.prefill_chunks) - 1)     # a step between every two chunks
    assert max(gaps) < 2 * bound_ms / 1e3, f"worst gap {max(gaps):.3f} s, chunks {len(long.prefill_chunks)}"
    assert whole.prefill.seconds > 2 * bound_ms / 1e3            # unchunked, the streams would have waited longer
    with model.context(n_ctx=4096, **CTX) as ctx:
        assert close_by_rounding(first[0], ctx.prefill(long_prompt, pipeline="force").logits)


def test_cancel_frees_the_kv_cells(model):
    with BatchedGenerator.open(model, n_seq=2, n_ctx=4096, **CTX) as gen:
        gen_run = gen.submit(prompt(50, seed=50), max_tokens=4000, temperature=0)
        pieces = iter(gen_run)
        next(pieces), next(pieces)
        waiting = [gen.submit(prompt(30, seed=51), max_tokens=4000), gen.submit(prompt(30, seed=52), max_tokens=4)]
        while gen.n_waiting:       # the second takes the free sequence, the third waits
            time.sleep(0.01)
            if gen.n_busy == 2 and gen.n_waiting == 1:
                break
        waiting[1].cancel()
        assert waiting[1].result(10).finish_reason == "cancelled" and waiting[1].seq is None
        for run in (gen_run, waiting[0]):
            run.cancel()
            assert run.result(10).finish_reason == "cancelled"
        assert gen.call(lambda ctx: [ctx.seq_len(s) for s in range(2)]) == [0, 0]
        # a prefill that is cancelled while it runs is aborted: no token, nothing left in the cache
        long = gen.submit(prompt(4000, seed=53), max_tokens=4, pipeline="force")
        while long.seq is None:
            time.sleep(0.005)
        time.sleep(0.05)
        t0 = time.perf_counter()
        long.cancel()
        done = long.result(10)
        assert done.finish_reason == "cancelled" and time.perf_counter() - t0 < 3
        assert gen.call(lambda ctx: ctx.seq_len(long.seq)) == 0
        assert gen.n_busy == 0 and gen.n_free == 2


def test_a_prompt_reuses_the_longest_cached_prefix_within_and_across_sequences(model):
    shared, tail_a, tail_b = prompt(300, seed=60), prompt(40, seed=61), prompt(40, seed=62)
    first_b = []
    with BatchedGenerator.open(model, n_seq=3, n_ctx=1024, **CTX) as gen:
        a = gen.submit(np.concatenate([shared, tail_a]), max_tokens=8, temperature=0)
        a.result(60)
        other = gen.submit(prompt(100, seed=63), max_tokens=4, temperature=0)      # a free sequence with no match
        other.result(60)
        again = gen.submit(np.concatenate([shared, tail_b]), max_tokens=4, temperature=0)
        assert again.result(60).n_cached == 300 and again.seq == a.seq           # within: the matching sequence
        assert again.result().prefill.n_tokens == 40
        # across: while `long` holds the shared prefix and generates, another prompt copies it
        long = gen.submit(np.concatenate([shared, tail_a]), max_tokens=4000, temperature=0)
        next(iter(long))
        b = gen.submit(np.concatenate([shared, tail_b]), max_tokens=2, temperature=0, on_logits=first_b.append)
        done = b.result(60)
        assert b.seq != long.seq and done.n_cached == 300 and done.prefill.n_tokens == 40
        long.cancel()
    alone_tokens, alone_logits = greedy_alone(model, np.concatenate([shared, tail_b]), 2)
    agree_until_a_tie(done.tokens, first_b, alone_tokens, alone_logits)


def test_requests_beyond_the_sequences_wait_in_arrival_order(model):
    order = []
    lock = threading.Lock()

    def record(name):
        def listener(item):
            if isinstance(item, pyturbo.Completion):
                with lock:
                    order.append(name)
        return listener

    with BatchedGenerator.open(model, n_seq=1, n_ctx=512, **CTX) as gen:
        runs = [gen.submit(prompt(20, seed=70 + i), max_tokens=5, temperature=0, listener=record(i))
                for i in range(4)]
        for r in runs:
            r.result(60)
    assert order == [0, 1, 2, 3]
    assert [r.t_admitted for r in runs] == sorted(r.t_admitted for r in runs)


def test_bad_requests_fail_at_submit(model):
    with BatchedGenerator.open(model, n_seq=2, n_ctx=128, **CTX) as gen:
        with pytest.raises(ValueError, match="larger n_ctx per sequence"):
            gen.submit(prompt(200), max_tokens=2)
        with pytest.raises(ValueError, match="max_tokens"):
            gen.submit(prompt(5), max_tokens=0)
        with pytest.raises(TypeError, match="unknown sampler"):
            gen.submit(prompt(5), temprature=0)
        full = gen.submit(prompt(120, seed=80), max_tokens=100, temperature=0).result(60)
        assert full.finish_reason == "length" and len(full.tokens) == 128 - 120 + 1
    with pytest.raises(ValueError, match="n_ctx"):
        with model.context(n_ctx=256, n_seq=2, **CTX) as ctx:
            BatchedGenerator(ctx, n_ctx=200)


# ---- through the server ---------------------------------------------------------------------------------------------

def parted_only_at_a_tie(alone: list[dict], batched: list[dict]) -> bool:
    """Two greedy answers' logprobs (OpenAI's chat content entries, with ids): the same tokens, or they part at a step
    where the alone answer's two most likely tokens were within twice the largest difference seen between the two
    answers' log-probabilities of the same tokens (up to that step)."""
    diff = 0.0
    for a, b in zip(alone, batched):
        a_top = {t["id"]: t["logprob"] for t in a["top_logprobs"]}
        b_top = {t["id"]: t["logprob"] for t in b["top_logprobs"]}
        diff = max([diff] + [abs(a_top[t] - b_top[t]) for t in set(a_top) & set(b_top)])
        if a["id"] != b["id"]:
            first, second = sorted(a_top.values(), reverse=True)[:2]
            return first - second <= 2 * diff
    return len(alone) == len(batched)


def test_eight_concurrent_greedy_requests_answer_as_each_alone(model_dir, tmp_path):
    pytest.importorskip("fastapi", reason="the server's dependencies are missing: pip install '.[test]'")
    httpx = pytest.importorskip("httpx", reason="the server's dependencies are missing: pip install '.[test]'")
    from concurrent.futures import ThreadPoolExecutor

    from pyturbo import synth, workers
    from serverproc import ServerProcess
    shape = synth.ModelShape(**{**synth.PRESETS["tiny"].__dict__, "n_vocab": synth.tiny_vocab_size()})
    path = synth.write_model(model_dir / "batching-chat.gguf", shape, seed=5, vocab="tiny",
                             chat_template=synth.TINY_CHAT_TEMPLATE)
    questions = [f"question {i}: " + " ".join(["the fox and the dog"] * (i + 1)) for i in range(8)]

    def ask(url, question):
        body = {"messages": [{"role": "user", "content": question}], "max_tokens": 16, "temperature": 0,
                "ignore_eos": True, "logprobs": True, "top_logprobs": 2, "cache_prompt": False}
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        return choice["message"]["content"], choice["logprobs"]["content"]

    with workers.local(2, threads=1) as pool, \
            ServerProcess(["--model", path, "--rpc", ",".join(pool.endpoints), "--n-ctx", "512", "--n-batch", "256",
                           "--n-ubatch", "32", "--threads", "1", "--parallel", "4"], tmp_path / "server.log") as srv:
        props = httpx.get(srv.url + "/props", timeout=10).json()
        assert props["total_slots"] == 4 and props["default_generation_settings"]["n_ctx"] == 512
        assert props["pyturbo"]["kv_cells"] == 4 * 512
        alone = [ask(srv.url, q) for q in questions]
        with ThreadPoolExecutor(8) as pool_of_clients:
            together = list(pool_of_clients.map(lambda q: ask(srv.url, q), questions))
        assert "Traceback" not in srv.log_tail(10**6)
    for (text_alone, lp_alone), (text, lp) in zip(alone, together):
        assert len(lp) == len(lp_alone) == 16
        assert text == text_alone or parted_only_at_a_tie(lp_alone, lp), (text_alone, text)


def test_forget_prompt_caches_frees_the_free_sequences_cells(model):
    with BatchedGenerator.open(model, n_seq=2, n_ctx=512, **CTX) as gen:
        gen.submit(prompt(100, seed=90), max_tokens=3, temperature=0).result(60)
        busy = gen.submit(prompt(50, seed=91), max_tokens=4000, temperature=0)
        next(iter(busy))
        assert gen.forget_prompt_caches() == 102      # the prompt and two of its three tokens were decoded
        lengths = gen.call(lambda ctx: [ctx.seq_len(s) for s in range(2)])
        assert lengths[busy.seq] > 50 and lengths[1 - busy.seq] == 0
        busy.cancel()


def test_chunks_prefilled_while_others_generate_are_not_recorded(model):
    """auto judges the paths by prefills alone: a prompt chunked between another sequence's decode steps records
    nothing for the decision and measures nothing (its chunks say why); the same kind of prompt alone records its
    run."""
    from pyturbo import policy
    with policy.calibration_scope(policy.Calibration(None)) as cal, \
            BatchedGenerator.open(model, n_seq=2, n_ctx=2048, max_gap_ms=50, **CTX) as gen:
        stream = gen.submit(prompt(20, seed=60), max_tokens=4000, temperature=0)
        pieces = iter(stream)
        next(pieces), next(pieces)
        chunked = gen.submit(prompt(600, seed=61), max_tokens=1, temperature=0)
        chunked.result(300)
        assert len(chunked.prefill_chunks) >= 2 and cal.samples == {}
        assert all("shared with other work" in c.decision for c in chunked.prefill_chunks)
        stream.cancel()
        stream.result(60)
        alone = gen.submit(prompt(600, seed=62), max_tokens=1, temperature=0)
        alone.result(300)
    assert len(alone.prefill_chunks) == 1 and "shared" not in alone.prefill_chunks[0].decision
    assert sum(len(runs) for paths in cal.samples.values() for runs in paths.values()) == 1

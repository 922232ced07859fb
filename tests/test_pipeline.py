"""Pipelined prefill leaves the same logits and KV cache as the standard path (issue: pipeline).

Both paths run the same kernels on the same devices with the same ubatch boundaries; only the order in which
devices work on different ubatches changes. So results are compared bit for bit, not with a tolerance.
"""
from __future__ import annotations

import numpy as np
import pytest

import pyturbo
from conftest import prompt
from pyturbo import synth
from pyturbo.results import within_first_ubatch_tolerance


def standard_and_pipelined(model, tokens, **ctx_kw):
    """The one harness every layout test uses: same model, tokens and split; standard, then pipelined."""
    with model.context(**ctx_kw) as ctx:
        std = ctx.prefill(tokens, pipeline=False)
        kv_std = ctx.kv_state()
        ctx.reset()
        pipe = ctx.prefill(tokens, pipeline="force")
        kv_pipe = ctx.kv_state()
    return std, pipe, kv_std, kv_pipe


def assert_identical(std, pipe, kv_std, kv_pipe, expect_path="pipelined"):
    assert pipe.path == expect_path, pipe.fallback_reason
    assert std.path == "standard"
    np.testing.assert_array_equal(pipe.logits, std.logits)
    assert kv_pipe == kv_std, "KV cache differs between the standard and the pipelined path"


@pytest.mark.parametrize("n_workers", [2, 3])
@pytest.mark.parametrize("n_tokens", [256, 301])  # 301: not a multiple of n_ubatch
def test_pipelined_equals_standard_over_rpc(tiny_model, rpc3, n_workers, n_tokens):
    with pyturbo.Model(tiny_model, rpc_servers=rpc3.endpoints[:n_workers], tensor_split="even") as model:
        assert len(model.devices) == n_workers
        res = standard_and_pipelined(model, prompt(n_tokens), n_ctx=1024, n_batch=512, n_ubatch=32, n_threads=1)
    assert_identical(*res)
    pipe = res[1]
    assert pipe.n_ubatches == -(-n_tokens // 32)
    assert pipe.n_stages == n_workers and pipe.n_in_flight >= n_workers
    assert pipe.slot_buffer_bytes > 0


def test_the_executor_decides_the_ubatches_in_flight(tiny_model, rpc3):
    """How many ubatches are in flight is decided by the executor alone (max_in_flight, else stages + 1): the context
    asks it (its memory check sizes the buffers with it) and a pipelined prefill keeps that many."""
    with pyturbo.Model(tiny_model, rpc_servers=rpc3.endpoints[:2], tensor_split="even") as model:
        for max_in_flight, expected in ((0, 3), (2, 2)):
            with model.context(n_ctx=1024, n_batch=512, n_ubatch=32, n_threads=1, max_in_flight=max_in_flight) as ctx:
                assert ctx.n_in_flight == expected
                res = ctx.prefill(prompt(256), pipeline="force")
                assert res.path == "pipelined" and res.n_in_flight == expected, res.fallback_reason


def test_prompt_longer_than_n_batch_pipelines_across_calls(tiny_model, rpc3):
    """n_batch 64 makes 6 captured llama_decode calls of 2 ubatches each; they form one pipelined series."""
    with pyturbo.Model(tiny_model, rpc_servers=rpc3.endpoints[:2]) as model:
        std, pipe, kv_std, kv_pipe = standard_and_pipelined(model, prompt(380), n_ctx=512, n_batch=64, n_ubatch=32, n_threads=1)
    assert_identical(std, pipe, kv_std, kv_pipe)
    assert pipe.n_ubatches == 12
    # ubatches of different llama_decode calls overlap in time: some stage starts ubatch k+1 before k has left the chain
    tl = pipe.timeline
    end_of = {u: max(r.end for r in tl if r.ubatch == u) for u in range(pipe.n_ubatches)}
    start_of = {u: min(r.start for r in tl if r.ubatch == u and r.stage >= 0) for u in range(pipe.n_ubatches)}
    assert any(start_of[u + 1] < end_of[u] for u in (1, 3, 5, 7, 9)), "no overlap across llama_decode boundaries"


def test_uneven_tensor_split(tiny_f16_model, rpc3):
    with pyturbo.Model(tiny_f16_model, rpc_servers=rpc3.endpoints, tensor_split=[1, 4, 1]) as model:
        res = standard_and_pipelined(model, prompt(200), n_ctx=512, n_batch=256, n_ubatch=16, n_threads=1)
    assert_identical(*res)


def test_decoding_after_pipelined_prefill_matches(tiny_model, rpc3):
    toks = prompt(150)
    with pyturbo.Model(tiny_model, rpc_servers=rpc3.endpoints[:2]) as model:
        with model.context(n_ctx=512, n_batch=512, n_ubatch=32, n_threads=1) as ctx:
            ctx.prefill(toks, pipeline=False)
            gen_std = ctx.generate(5)
            after_std = ctx.logits()
            ctx.reset()
            assert ctx.prefill(toks, pipeline="force").path == "pipelined"
            gen_pipe = ctx.generate(5)
            after_pipe = ctx.logits()
    assert gen_pipe == gen_std
    np.testing.assert_array_equal(after_pipe, after_std)


def test_single_device_falls_back_with_reason(tiny_model):
    # devices=[]: the CPU alone, also on a machine whose GPUs would otherwise share the layers
    with pyturbo.Model(tiny_model, devices=[]) as model:
        std, pipe, kv_std, kv_pipe = standard_and_pipelined(model, prompt(200), n_ctx=512, n_ubatch=32, n_threads=1)
    assert_identical(std, pipe, kv_std, kv_pipe, expect_path="standard")
    assert "single device" in pipe.fallback_reason
    assert len(pipe.timeline) == 0


def test_short_prompt_falls_back_with_reason(tiny_model, rpc3):
    with pyturbo.Model(tiny_model, rpc_servers=rpc3.endpoints[:2]) as model:
        std, pipe, kv_std, kv_pipe = standard_and_pipelined(model, prompt(20), n_ctx=512, n_ubatch=32, n_threads=1)
    assert_identical(std, pipe, kv_std, kv_pipe, expect_path="standard")
    assert "fewer than two ubatches" in pipe.fallback_reason


def test_timing_records_cover_every_ubatch_and_stage(tiny_model, rpc3):
    seen = []
    with pyturbo.Model(tiny_model, rpc_servers=rpc3.endpoints, tensor_split="even") as model:
        with model.context(n_ctx=512, n_batch=512, n_ubatch=32, n_threads=1) as ctx:
            res = ctx.prefill(prompt(256), pipeline="force", on_ubatch=seen.append)
    tl = res.timeline
    layer = [r for r in tl if r.stage >= 0]
    assert {(r.ubatch, r.stage) for r in layer} == {(u, s) for u in range(8) for s in range(3)}
    assert len(seen) == len(tl)
    assert all(r.device == model.devices[r.stage] for r in layer)
    assert {r.clock for r in tl} == {"host"}  # CPU and RPC stages: host clock (device timing events are CUDA's)
    for r in tl:
        assert 0 <= r.start <= r.end <= res.seconds + 1e-3
    # per stage, ubatches run in order and never overlap
    for s in range(3):
        rows = sorted((r for r in layer if r.stage == s), key=lambda r: r.ubatch)
        assert all(a.end <= b.start for a, b in zip(rows, rows[1:]))
    # a stage starts ubatch k only after the previous stage finished it
    by = {(r.ubatch, r.stage): r for r in layer}
    assert all(by[u, s].start >= by[u, s - 1].end for u in range(8) for s in range(1, 3))
    assert 0 < tl.efficiency() <= 1
    assert "#" in tl.ascii()


def test_prefill_continues_a_sequence(tiny_model, rpc3):
    """A second pipelined prefill appends to the KV cache exactly as the standard path does."""
    a, b = prompt(100, seed=1), prompt(130, seed=2)
    with pyturbo.Model(tiny_model, rpc_servers=rpc3.endpoints[:2]) as model:
        with model.context(n_ctx=512, n_batch=512, n_ubatch=32, n_threads=1) as ctx:
            ctx.prefill(a, pipeline=False)
            std = ctx.prefill(b, pipeline=False)
            kv_std = ctx.kv_state()
            ctx.reset()
            ctx.prefill(a, pipeline=False)
            pipe = ctx.prefill(b, pipeline="force")
            assert ctx.n_past == 230
            kv_pipe = ctx.kv_state()
    assert_identical(std, pipe, kv_std, kv_pipe)


def test_cpu_stage_before_an_rpc_stage(tiny_model, rpc3):
    """n_gpu_layers=2: the first two layers stay on the local CPU, which becomes a pipeline stage of its own."""
    with pyturbo.Model(tiny_model, rpc_servers=rpc3.endpoints[:1], n_gpu_layers=2) as model:
        assert model.devices[0] == "CPU" and model.devices[1].startswith("RPC")
        res = standard_and_pipelined(model, prompt(256), n_ctx=512, n_batch=512, n_ubatch=32, n_threads=1)
    assert_identical(*res)


def test_auto_decides_from_its_own_measurements(tiny_model, rpc3):
    """calibrate() measures both paths; auto then takes the faster one by those numbers and says so. Which one is
    faster on this machine is not asserted (it is what is being measured); that the choice follows the numbers is."""
    from pyturbo import policy
    with pyturbo.Model(tiny_model, rpc_servers=rpc3.endpoints, tensor_split="even") as model:
        with model.context(n_ctx=1024, n_batch=512, n_ubatch=32, n_threads=1) as ctx:
            toks = prompt(300)
            measured = ctx.calibrate(toks)
            assert len(measured["pipelined"]) == len(measured["standard"]) == policy.SAMPLES_PER_PATH
            res = ctx.prefill(toks)
    faster = ("pipelined" if np.median(measured["pipelined"]) >= np.median(measured["standard"]) else "standard")
    assert res.path == faster and res.decision.startswith("calibrated"), res.decision
    std_ref = prompt(300)  # the decision changes the path, never the numbers
    with pyturbo.Model(tiny_model, rpc_servers=rpc3.endpoints, tensor_split="even") as model:
        with model.context(n_ctx=1024, n_batch=512, n_ubatch=32, n_threads=1) as ctx:
            np.testing.assert_array_equal(ctx.prefill(std_ref, pipeline=False).logits, res.logits)


def test_layers_per_stage_follow_the_split_llama_cpp_makes(tiny_f16_model, rpc3):
    """Model.layers_per_stage (used to balance stages) against llama.cpp's own assignment, read from its load log."""
    import collections
    import logging
    from pyturbo.model import layer_split
    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("pyturbo.llama")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        for layers in ([1, 4, 1], [2, 2, 2]):
            lines.clear()
            with pyturbo.Model(tiny_f16_model, rpc_servers=rpc3.endpoints, tensor_split=layer_split(layers)) as model:
                # layer -> device (the memory plan loads the model once more, without allocating: same lines)
                owner = {int(line.split("layer")[1].split("assigned")[0]): line.split("device")[1].split(",")[0].strip()
                         for line in lines if "assigned to device" in line}
                assigned = collections.Counter(dev for layer, dev in owner.items() if layer < model.n_layer)
            assert model.layers_per_stage == layers
            assert [assigned[d] for d in model.devices] == layers, lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def test_graphs_reused_across_prompts_give_the_same_results(tiny_model, rpc3):
    """A slot reuses the graph it built for the previous prompt where the shapes match (ubatch k of a prompt from an
    empty cache); a different prompt through reused graphs must still equal the standard path, as must a shorter
    prompt whose last ubatch needs a new graph."""
    with pyturbo.Model(tiny_model, rpc_servers=rpc3.endpoints[:2]) as model, \
            model.context(n_ctx=512, n_batch=512, n_ubatch=32, n_threads=1) as ctx:
        for seed, n in ((1, 96), (2, 96), (3, 80), (4, 96)):   # 3 ubatches: every one has a slot of its own
            toks = prompt(n, seed=seed)
            ctx.reset()
            std = ctx.prefill(toks, pipeline=False)
            kv_std = ctx.kv_state()
            ctx.reset()
            pipe = ctx.prefill(toks, pipeline="force")
            assert_identical(std, pipe, kv_std, ctx.kv_state())


class StopPrefill(Exception):
    pass


@pytest.mark.parametrize("spin", ["0", "1"])
def test_stage_threads_serve_replay_after_replay(tiny_model, rpc3, monkeypatch, spin):
    """The stage threads outlive a replay, sleeping or (LLAMA_TURBO_SPIN=1, the GPU layouts' default) spinning while
    their next split is near: prefill after prefill, also after an aborted one, the results equal the standard path."""
    monkeypatch.setenv("LLAMA_TURBO_SPIN", spin)
    with pyturbo.Model(tiny_model, rpc_servers=rpc3.endpoints[:3]) as model, \
            model.context(n_ctx=512, n_batch=512, n_ubatch=32, n_threads=1) as ctx:
        toks = prompt(160)
        std = ctx.prefill(toks, pipeline=False)
        kv_std = ctx.kv_state()
        for i in range(3):
            if i == 1:   # an aborted replay in between (a callback that raises stops it): threads wait for the next
                def stop(record):
                    raise StopPrefill
                ctx.reset()
                with pytest.raises(StopPrefill):
                    ctx.prefill(toks, pipeline="force", on_ubatch=stop)
            ctx.reset()
            pipe = ctx.prefill(toks, pipeline="force")
            assert_identical(std, pipe, kv_std, ctx.kv_state())
            assert {r.ubatch for r in pipe.timeline} == set(range(pipe.n_ubatches))


def assert_within_first_ubatch_tolerance(logits: np.ndarray, uniform: np.ndarray) -> None:
    """pyturbo.results.FIRST_UBATCH_TOLERANCE says why the bound. "mid-f16" below is wide enough for the CPU's
    kernels to round differently with other shapes (the tiny models do not; bench/results/2026-11-26-gpu-host-time.md)."""
    assert within_first_ubatch_tolerance(logits, uniform), float(np.max(np.abs(logits - uniform)))


@pytest.mark.parametrize("shape", ["tiny", "tiny-f16", "mid-f16"])
def test_first_ubatch_schedule(shape, rpc3, request):
    """A smaller first ubatch (opt-in): both paths run the same ubatches, so pipelined equals standard bit for bit;
    against uniform ubatches the logits agree within pyturbo.results.FIRST_UBATCH_TOLERANCE."""
    if shape == "mid-f16":
        path = synth.cached_model(synth.ModelShape(n_layer=4, n_embd=512, n_ff=1024, n_head=8, n_head_kv=2,
                                                   n_vocab=1000, dtype="f16"))
    else:
        path = request.getfixturevalue({"tiny": "tiny_model", "tiny-f16": "tiny_f16_model"}[shape])
    toks = prompt(200)
    with pyturbo.Model(path, rpc_servers=rpc3.endpoints) as model:
        with model.context(n_ctx=512, n_batch=128, n_ubatch=64, n_threads=1) as ctx:
            uniform = ctx.prefill(toks, pipeline=False)
        std, pipe, kv_std, kv_pipe = standard_and_pipelined(model, toks, n_ctx=512, n_batch=128, n_ubatch=64,
                                                            n_threads=1, first_ubatch=20)
    assert_identical(std, pipe, kv_std, kv_pipe)
    sizes = {r.ubatch: r.n_tokens for r in pipe.timeline}
    assert sizes == {0: 20, 1: 64, 2: 64, 3: 52}   # calls of 20 and 128 tokens (n_batch), cut into ubatches of 64
    assert_within_first_ubatch_tolerance(pipe.logits, uniform.logits)


def test_first_ubatch_tolerance_rejects_real_differences():
    uniform = np.array([0.5, 4.0, -2.0, 1.0], dtype=np.float32)
    assert within_first_ubatch_tolerance(uniform + 0.1, uniform)            # 2.5% of the largest logit
    assert not within_first_ubatch_tolerance(uniform + 0.2, uniform)        # 5%
    close = np.array([0.5, 4.0, -2.0, 3.99], dtype=np.float32)
    swapped = np.array([0.5, 3.99, -2.0, 4.0], dtype=np.float32)             # within the bound, another top token
    assert not within_first_ubatch_tolerance(swapped, close)


def test_first_ubatch_is_checked(tiny_model):
    with pyturbo.Model(tiny_model) as model:
        for bad in (0, 33, 8.0):
            with pytest.raises(ValueError, match="first_ubatch"):
                model.context(n_ctx=256, n_ubatch=32, first_ubatch=bad)

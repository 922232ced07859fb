"""Server-to-server copies (patches/0011): on the pipelined path each RPC worker sends its result to the next worker
itself, so the activations no longer cross this process's link; the logits are the same bits as the relayed ones and
the standard path's."""
from __future__ import annotations

import numpy as np
import pytest

import pyturbo
from pyturbo import workers
from pyturbo.devices import GPU, Device, resolve_input_layer

from conftest import prompt

N_WORKERS = 3
N_UBATCH = 64


def prefill(model, tokens, pipeline, rpc_transfers):
    """(logits, PrefillResult, bytes through this process during the prefill)."""
    with model.context(n_ctx=1024, n_batch=1024, n_ubatch=N_UBATCH, n_threads=1, rpc_transfers=rpc_transfers) as ctx:
        ctx.prefill(prompt(8, seed=99), pipeline=pipeline)   # the first graphs and buffers are not what is measured
        ctx.reset()
        before = model.rpc_traffic()
        result = ctx.prefill(tokens, pipeline=pipeline)
        after = model.rpc_traffic()
        moved = sum(a[0] + a[1] - b[0] - b[1] for a, b in zip(after.values(), before.values()))
        return ctx.logits().copy(), result, moved


@pytest.fixture(scope="module")
def split_model(tiny_model):
    with workers.local(N_WORKERS, threads=1) as pool, \
            pyturbo.Model(tiny_model, rpc_servers=pool.endpoints, tensor_split="even") as model:
        yield model


def test_direct_copies_give_the_relayed_and_the_standard_bits(split_model):
    tokens = prompt(600)
    standard, _, _ = prefill(split_model, tokens, "off", "direct")
    relayed, relay_result, _ = prefill(split_model, tokens, "force", "relay")
    direct, direct_result, _ = prefill(split_model, tokens, "force", "direct")
    assert relay_result.path == direct_result.path == "pipelined"
    assert direct_result.transfers == "server-to-server"
    assert relay_result.transfers.startswith("through this process")
    assert np.array_equal(direct, standard) and np.array_equal(relayed, standard)


def test_the_activations_no_longer_cross_this_process(split_model):
    """Relayed, each boundary between two workers crosses this process's link twice per ubatch (worker -> here ->
    next worker); direct, not at all: what is left is the first stage's input, the last stage's output, the graphs
    and small reads. The difference must be at least 90% of those 2 (S-1) A bytes per ubatch."""
    tokens = prompt(640)
    n_ubatches = len(tokens) // N_UBATCH
    activation = N_UBATCH * split_model.n_embd * 4   # A: one ubatch's hidden state, F32
    _, relay_result, relayed = prefill(split_model, tokens, "force", "relay")
    _, direct_result, direct = prefill(split_model, tokens, "force", "direct")
    assert relay_result.n_ubatches == direct_result.n_ubatches == n_ubatches
    boundary_bytes = 2 * (N_WORKERS - 1) * activation * n_ubatches
    assert relayed - direct >= 0.9 * boundary_bytes, (relayed, direct, boundary_bytes)


def test_a_worker_that_dies_during_direct_copies_ends_the_prefill_with_an_error(tiny_model):
    """A killed middle worker: its peers wait for bytes that never come; the prefill raises ContextDeadError
    (bounded by the RPC timeout, not a hang) and the context reports itself dead."""
    import threading
    with workers.local(N_WORKERS, threads=1) as pool, \
            pyturbo.Model(tiny_model, rpc_servers=pool.endpoints, tensor_split="even", rpc_timeout=20) as model, \
            model.context(n_ctx=4096, n_batch=4096, n_ubatch=16, n_threads=1) as ctx:
        ctx.prefill(prompt(64), pipeline="force")
        ctx.reset()
        killer = threading.Timer(0.05, lambda: pool.procs[1].kill())
        killer.start()
        try:
            with pytest.raises(pyturbo.ContextDeadError):
                for _ in range(50):   # bounded: one of these runs while the worker dies
                    ctx.prefill(prompt(4000), pipeline="force")
                    ctx.reset()
        finally:
            killer.join()
        with pytest.raises(pyturbo.ContextDeadError):
            ctx.logits()


@pytest.mark.parametrize("wire", ["f16", "bf16"])
def test_a_compact_wire_rounds_within_its_tolerance(split_model, wire):
    """Opt-in: activations travel between workers in half the bytes, rounded once per boundary. The logits are not
    the exact ones (the rounding must show, or the option did nothing) but within RPC_WIRE_TOLERANCE of them."""
    from pyturbo.results import RPC_WIRE_TOLERANCE, within_tolerance
    tokens = prompt(400, seed=3)
    exact, _, _ = prefill(split_model, tokens, "force", "direct")
    with split_model.context(n_ctx=1024, n_batch=1024, n_ubatch=N_UBATCH, n_threads=1, rpc_wire=wire) as ctx:
        result = ctx.prefill(tokens, pipeline="force")
        compact = ctx.logits().copy()
    assert result.transfers == "server-to-server"
    assert not np.array_equal(compact, exact)
    assert within_tolerance(compact, exact, RPC_WIRE_TOLERANCE)


def test_bad_transfer_settings_are_refused(split_model):
    with pytest.raises(ValueError, match="rpc_transfers"):
        split_model.context(n_ctx=256, rpc_transfers="carrier pigeon")
    with pytest.raises(ValueError, match="rpc_wire"):
        split_model.context(n_ctx=256, rpc_wire="f8")


def test_a_worker_that_cannot_reach_the_next_one_relays_with_the_reason(tiny_model):
    """The first worker in a network namespace of its own, the second on this host's loopback: this process reaches
    both, but 127.0.0.1 means the namespace itself from the first worker's side. That hop is relayed, the result says
    why, and the logits are the standard path's."""
    from pyturbo.tools import links
    reason = links.unavailable_reason()
    if reason:
        pytest.skip(reason)
    with links.Links(1, rate=None) as net, workers.local(1, threads=1) as local, \
            pyturbo.Model(tiny_model, rpc_servers=net.endpoints + local.endpoints, tensor_split="even") as model:
        tokens = prompt(300)
        standard, _, _ = prefill(model, tokens, "off", "direct")
        direct, result, _ = prefill(model, tokens, "force", "direct")
        assert result.path == "pipelined"
        assert result.transfers.startswith("through this process") and local.endpoints[0] in result.transfers
        assert "cannot reach" in result.transfers or "another server" in result.transfers, result.transfers
        assert np.array_equal(direct, standard)


def test_the_input_layer_on_the_first_worker_sends_token_ids_instead_of_embeddings(tiny_model):
    """Model(input_layer="first-device") (patches/0012): the same logits as with the embeddings on the CPU (a lookup
    is a copy), and the first worker's embeddings no longer cross this process's link: at least 90% of A per ubatch
    fewer bytes."""
    tokens = prompt(640)
    with workers.local(N_WORKERS, threads=1) as pool:
        measured = {}
        for layer in ("cpu", "first-device"):
            with pyturbo.Model(tiny_model, rpc_servers=pool.endpoints, tensor_split="even", input_layer=layer) as m:
                for pipeline in ("off", "force"):
                    measured[layer, pipeline] = prefill(m, tokens, pipeline, "direct")
                activation = N_UBATCH * m.n_embd * 4
    reference = measured["cpu", "off"][0]
    assert all(np.array_equal(logits, reference) for logits, _, _ in measured.values())
    n_ubatches = measured["cpu", "force"][1].n_ubatches
    saved = measured["cpu", "force"][2] - measured["first-device", "force"][2]
    assert saved >= 0.9 * activation * n_ubatches, (saved, activation * n_ubatches)


def test_the_default_input_layer_is_the_first_worker_only_when_every_layer_is_on_workers(split_model, tiny_model):
    """input_layer="auto": over RPC workers alone the embeddings live on the first worker (their bytes would cross
    the network for every ubatch); with a local device in the layout, or weights in this process's memory, they stay
    on the CPU, as llama.cpp places them."""
    assert split_model.input_layer == "first-device"
    with pyturbo.Model(tiny_model) as local:
        assert local.input_layer == "cpu"
    rpc, gpu = Device("RPC0", "127.0.0.1:1", GPU), Device("CUDA0", "a GPU", GPU)
    assert resolve_input_layer("auto", ["CUDA0", "RPC0"], [rpc, gpu], host_weights=False) == "cpu"
    assert resolve_input_layer("auto", ["RPC0"], [rpc, gpu], host_weights=False) == "first-device"
    assert resolve_input_layer("auto", ["RPC0"], [rpc, gpu], host_weights=True) == "cpu"     # the CPU is a stage
    assert resolve_input_layer("cpu", ["RPC0"], [rpc, gpu], host_weights=False) == "cpu"


def test_a_bad_input_layer_is_refused(tiny_model):
    with pytest.raises(ValueError, match="input_layer"):
        pyturbo.Model(tiny_model, input_layer="gpu")


def test_direct_copies_resume_after_a_worker_is_restarted(tiny_model):
    """A worker restarted on the same port is another server: the next model's workers must copy to the new one (a
    link kept from before would reach nobody, or be mistaken for another server and relayed)."""
    tokens = prompt(300)
    with workers.local(N_WORKERS, threads=1) as pool:
        with pyturbo.Model(tiny_model, rpc_servers=pool.endpoints, tensor_split="even") as model:
            before, result, _ = prefill(model, tokens, "force", "direct")
            assert result.transfers == "server-to-server"
        pool.restart(N_WORKERS - 1)
        with pyturbo.Model(tiny_model, rpc_servers=pool.endpoints, tensor_split="even") as model:
            after, result, _ = prefill(model, tokens, "force", "direct")
            assert result.transfers == "server-to-server"
    assert np.array_equal(before, after)


@pytest.mark.parametrize("pipeline", ["off", "force"])
def test_the_kq_mask_crosses_the_link_as_runs(split_model, pipeline):
    """patches/0013: every worker gets each ubatch's KQ mask (n_ubatch x n_kv values, nearly all 0 or -inf) as runs
    of repeated words. 640 tokens behind 2048 cached ones have masks over ~2.5K cells instead of ~0.4K; sent as they
    are, that would be >= 2 bytes x 64 x 2048 more per ubatch and worker (~7.8 MB here). As runs, the bytes through
    this process hardly change with the context's length."""
    tokens = prompt(640, seed=7)
    with split_model.context(n_ctx=4096, n_batch=1024, n_ubatch=N_UBATCH, n_threads=1) as ctx:
        ctx.prefill(prompt(8, seed=99), pipeline=pipeline)   # the first graphs and buffers are not what is measured
        moved = []
        for n_cached in (0, 2048):
            ctx.reset()
            if n_cached:
                ctx.prefill(prompt(n_cached, seed=8), pipeline=pipeline)
            before = split_model.rpc_traffic()
            result = ctx.prefill(tokens, pipeline=pipeline)
            after = split_model.rpc_traffic()
            moved.append(sum(a[0] + a[1] - b[0] - b[1] for a, b in zip(after.values(), before.values())))
    plain_growth = 2 * N_UBATCH * 2048 * N_WORKERS * result.n_ubatches   # F16 masks; F32 would be twice that
    assert moved[1] - moved[0] < 0.05 * plain_growth, (moved, plain_growth)

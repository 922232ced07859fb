"""Several contexts on the same RPC workers: each thread's results equal that context's results alone, and a second
process is refused with a clear error instead of sharing a worker."""
from __future__ import annotations

import threading

import numpy as np
import pytest

import pyturbo
from pyturbo import workers

from conftest import prompt, run_python

ROUNDS = 40


def _prefill_logits(ctx, tokens, pipeline) -> np.ndarray:
    ctx.reset()
    ctx.prefill(tokens, pipeline=pipeline)
    return ctx.logits().copy()


def _run_together(contexts, tokens, modes, reference) -> list[list[int]]:
    """Each context prefills its own tokens ROUNDS times from its own thread, all at once; the rounds whose logits
    differ from the context alone, per context."""
    wrong: list[list[int]] = [[] for _ in contexts]
    errors: list[BaseException] = []
    start = threading.Barrier(len(contexts))

    def work(i):
        try:
            start.wait(timeout=30)
            for r in range(ROUNDS):
                if not np.array_equal(_prefill_logits(contexts[i], tokens[i], modes[i]), reference[i]):
                    wrong[i].append(r)
        except BaseException as e:  # reported below: a thread's exception must fail the test, not vanish
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(contexts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a prefill thread did not finish within 300 s"
    assert not errors, errors
    return wrong


# Graph reuse is what went wrong here (llama.cpp reuses a ubatch's graph when its shape repeats, and ggml-rpc then
# asks the worker to recompute the graph it stored; patches/0009): every round prefills the same tokens after a reset,
# so every ubatch after the first is such a reuse, interleaved with the other context's graphs on the same workers.
@pytest.mark.parametrize("models", ["one model", "two models"])
@pytest.mark.parametrize("modes", [("off", "off"), ("force", "force"), ("off", "force")])
def test_two_contexts_on_the_same_workers_each_get_their_own_logits(tiny_model, models, modes):
    with workers.local(2, threads=1) as pool:
        owners = [pyturbo.Model(tiny_model, rpc_servers=pool.endpoints)]
        if models == "two models":
            owners.append(pyturbo.Model(tiny_model, rpc_servers=pool.endpoints))
        try:
            contexts = [owners[i % len(owners)].context(n_ctx=512, n_batch=512, n_ubatch=16, n_threads=1)
                        for i in range(2)]
            tokens = [prompt(200, seed=10 + i) for i in range(2)]
            reference = [_prefill_logits(c, t, m) for c, t, m in zip(contexts, tokens, modes)]
            assert not np.array_equal(reference[0], reference[1])   # a swap of results would show
            wrong = _run_together(contexts, tokens, modes, reference)
            assert wrong == [[], []], f"rounds with logits other than the context's own, per context: {wrong}"
            for c in contexts:
                c.close()
        finally:
            for m in owners:
                m.close()


def test_a_second_process_is_told_the_workers_are_taken_then_gets_them(tiny_model):
    """An RPC worker serves one client (connection) at a time; a second process waits for the handshake and is
    refused with a message that says why, and gets the workers once the first has let them go."""
    with workers.local(1, threads=1) as pool:
        code = f"""
            import pyturbo
            try:
                pyturbo.Model({str(tiny_model)!r}, rpc_servers={pool.endpoints!r}, rpc_timeout=2)
                print("LOADED")
            except pyturbo.WorkerError as e:
                print("REFUSED", e)
        """
        with pyturbo.Model(tiny_model, rpc_servers=pool.endpoints) as first:
            busy = run_python(code)
            assert busy.returncode == 0, busy.stderr[-2000:]
            assert "REFUSED" in busy.stdout and "one client at a time" in busy.stdout, busy.stdout
            with first.context(n_ctx=256, n_ubatch=32, n_threads=1) as ctx:   # the first is unaffected
                ctx.prefill(prompt(64), pipeline="off")
        free = run_python(code)
        assert free.returncode == 0 and "LOADED" in free.stdout, (free.stdout, free.stderr[-2000:])

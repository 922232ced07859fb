"""Ctrl-C semantics, driven deterministically: an interrupt is landed at a chosen point of
Context._run_interruptible through the _calls.test_hook, or sent as a real SIGINT from a chosen ubatch record.

The contract (README, "Failure behaviour"): KeyboardInterrupt means the context is as it was before the call; a
call that returns has completed (a Ctrl-C that came too late to stop it is raised by the next call, before that one
changes anything); ContextDeadError means a device may have been left mid-operation.
"""
from __future__ import annotations

import signal
import threading
import time

import numpy as np
import pytest

import pyturbo
from pyturbo import _calls
from conftest import prompt


@pytest.fixture
def ctx(tiny_model, rpc3):
    with pyturbo.Model(tiny_model, rpc_servers=rpc3.endpoints[:2]) as model:
        with model.context(n_ctx=4096, n_batch=4096, n_ubatch=16, n_threads=1) as c:
            yield c


@pytest.fixture
def interrupt_at(monkeypatch):
    """interrupt_at(point): the next C call on a context (not a wait before it, such as a memory check) gets a
    KeyboardInterrupt on its calling thread at that point."""
    def arm(point: str):
        fired = []

        def hook(p, call):
            if p == point and call.thread.name == "pyturbo-call" and not fired:
                fired.append(p)
                raise KeyboardInterrupt(f"test interrupt at {p}")
        monkeypatch.setattr(_calls, "test_hook", hook)
        return fired
    return arm


def no_call_running() -> bool:
    return not any(t.name == "pyturbo-call" and t.is_alive() for t in threading.enumerate())


def reference_logits(ctx, prefix, toks):
    ctx.reset()
    ctx.prefill(prefix)
    out = ctx.prefill(toks).logits
    ctx.reset()
    return out


@pytest.mark.parametrize("pipeline", [True, False], ids=["pipelined", "standard"])
def test_interrupt_before_the_call_starts_changes_nothing(ctx, interrupt_at, pipeline):
    """Race (a): the interrupt lands just before the helper thread starts. Before, the prefill went on in the
    background and the next call ran concurrently with it."""
    ctx.prefill(prompt(40, seed=1))
    kv = ctx.kv_state()
    fired = interrupt_at("start")
    with pytest.raises(KeyboardInterrupt, match="before it started: nothing changed"):
        ctx.prefill(prompt(800), pipeline=pipeline)
    assert fired and no_call_running()
    assert ctx.n_past == 40 and ctx.kv_state() == kv


def test_interrupt_inside_thread_start_is_handled(ctx, monkeypatch):
    """Race (a), the other side: the interrupt lands inside Thread.start(), after the thread exists. The call is
    then stopped like any running call: whatever the outcome, no call is left running and the context is
    consistent with what was raised."""
    real_start = _calls.BackgroundCall.start

    def start_then_interrupt(self):
        real_start(self)
        raise KeyboardInterrupt("test interrupt inside start()")

    monkeypatch.setattr(_calls.BackgroundCall, "start", start_then_interrupt)
    try:
        ctx.prefill(prompt(2000), pipeline="force")
        completed = True
    except KeyboardInterrupt:
        completed = False
    monkeypatch.undo()
    assert no_call_running()
    if completed:
        assert ctx.n_past == 2000
        with pytest.raises(KeyboardInterrupt, match="previous call on this context completed"):
            ctx.prefill([1])
    assert ctx.n_past == (2000 if completed else 0)


def test_interrupt_while_running_rolls_back(ctx, interrupt_at):
    ctx.prefill(prompt(40, seed=1))
    kv = ctx.kv_state()
    interrupt_at("started")
    with pytest.raises(KeyboardInterrupt, match="as it was before the call"):
        ctx.prefill(prompt(4000), pipeline="force")
    assert no_call_running() and ctx.n_past == 40 and ctx.kv_state() == kv


@pytest.mark.parametrize("pipeline", [True, False], ids=["pipelined", "standard"])
def test_interrupt_after_completion_returns_and_is_raised_by_the_next_call(ctx, interrupt_at, pipeline):
    """Race (b): the interrupt lands after the prefill completed. Before, KeyboardInterrupt was raised although the
    tokens stayed in the cache, so a retry doubled the prompt. Now the call returns its (correct) result, and the
    next call raises the interrupt before it changes anything."""
    prefix, toks = prompt(40, seed=1), prompt(64)
    ref = reference_logits(ctx, prefix, toks)
    ctx.prefill(prefix)
    interrupt_at("finished")
    res = ctx.prefill(toks, pipeline=pipeline)
    np.testing.assert_array_equal(res.logits, ref)
    assert ctx.n_past == 104
    kv = ctx.kv_state.__wrapped__(ctx)  # the state, without consuming the pending interrupt
    with pytest.raises(KeyboardInterrupt, match="previous call on this context completed"):
        ctx.prefill(prompt(10))
    assert ctx.n_past == 104 and ctx.kv_state() == kv
    assert ctx.prefill(prompt(10)).n_tokens == 10  # and only once


def test_sigint_while_the_result_is_built_is_kept_for_the_next_call(ctx, monkeypatch):
    """The last window: a real SIGINT handled after the C call returned, while prefill builds its result (found by the
    fault injection: KeyboardInterrupt raised from logits() with the tokens in the cache). The call returns its
    result; the next call raises the interrupt."""
    from pyturbo import _native
    prefix, toks = prompt(40, seed=1), prompt(300)
    ref = reference_logits(ctx, prefix, toks)
    ctx.prefill(prefix)
    real_drain, sent = _native.drain_log, []

    def drain_then_interrupt():  # prefill calls it right after the C call returned
        real_drain()
        if not sent:
            sent.append(True)
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
            time.sleep(0.05)  # the handler runs here, inside prefill

    monkeypatch.setattr(_native, "drain_log", drain_then_interrupt)
    res = ctx.prefill(toks)
    monkeypatch.undo()
    assert sent
    np.testing.assert_array_equal(res.logits, ref)
    with pytest.raises(KeyboardInterrupt, match="previous call on this context completed"):
        ctx.prefill([1])
    assert ctx.n_past == 340


def test_real_sigint_mid_prefill_rolls_back(ctx):
    """A real SIGINT, sent to the main thread when the third ubatch record arrives (the prefill is then running)."""
    ctx.prefill(prompt(40, seed=1))
    kv = ctx.kv_state()
    seen = []

    def on_ubatch(rec):
        seen.append(rec)
        if len(seen) == 3:
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    with pytest.raises(KeyboardInterrupt, match="as it was before the call"):
        ctx.prefill(prompt(3000), pipeline="force", on_ubatch=on_ubatch)
    assert no_call_running() and ctx.n_past == 40 and ctx.kv_state() == kv


@pytest.mark.parametrize("at_record", [-1, -2])
def test_real_sigint_at_the_end_is_either_rolled_back_or_completed(ctx, at_record):
    """A real SIGINT as the last records arrive, when the prefill is about to complete: either outcome is allowed,
    and each must be exactly what it says."""
    prefix, toks = prompt(40, seed=1), prompt(200)
    ref = reference_logits(ctx, prefix, toks)
    ctx.prefill(prefix)
    n_records = 200 // 16 * 2 + 2  # 13 ubatches on 2 stages
    seen = []

    def on_ubatch(rec):
        seen.append(rec)
        if len(seen) == n_records + 1 + at_record:
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    try:
        res = ctx.prefill(toks, pipeline="force", on_ubatch=on_ubatch)
    except KeyboardInterrupt:
        assert ctx.n_past == 40
        return
    np.testing.assert_array_equal(res.logits, ref)
    assert ctx.n_past == 240
    with pytest.raises(KeyboardInterrupt):  # the signal came during the call: the next call raises it
        ctx.prefill([1])
    assert ctx.n_past == 240

"""Interrupts, dying workers and repeated runs (issue: pipeline, robustness)."""
from __future__ import annotations

import itertools
import resource
import threading
import time

import numpy as np
import pytest

import pyturbo
from conftest import prompt, run_python


def test_interrupt_during_pipelined_prefill_leaves_context_usable(tiny_model, rpc3):
    with pyturbo.Model(tiny_model, rpc_servers=rpc3.endpoints[:2]) as model:
        with model.context(n_ctx=2048, n_batch=2048, n_ubatch=16, n_threads=1) as ctx:
            ctx.prefill(prompt(40, seed=5))
            kv_before = ctx.kv_state()
            records_seen = itertools.count(1)

            def stop_after_three(record):
                if next(records_seen) == 3:  # as Ctrl-C would, from inside the call
                    raise KeyboardInterrupt

            t0 = time.monotonic()
            with pytest.raises(KeyboardInterrupt):
                ctx.prefill(prompt(1500), pipeline="force", on_ubatch=stop_after_three)
            assert time.monotonic() - t0 < 30
            assert ctx.n_past == 40, "positions of the interrupted prefill remain in the KV cache"
            assert ctx.kv_state() == kv_before
            # and the context still works, with the same results as an uninterrupted run (twice: every slot of the
            # interrupted replay must be usable again)
            ctx.prefill(prompt(600, seed=9), pipeline="force")
            ctx.reset()
            ctx.prefill(prompt(40, seed=5))
            res = ctx.prefill(prompt(200), pipeline="force")
            assert res.path == "pipelined"
            kv_after = ctx.kv_state()
            ctx.reset()
            ctx.prefill(prompt(40, seed=5))
            ref = ctx.prefill(prompt(200), pipeline=False)
            np.testing.assert_array_equal(res.logits, ref.logits)
            assert ctx.kv_state() == kv_after


def test_abort_from_another_thread(tiny_model, rpc3):
    """What Ctrl-C does: pt_request_abort from another thread while the prefill runs."""
    from pyturbo import _native
    with pyturbo.Model(tiny_model, rpc_servers=rpc3.endpoints[:2]) as model:
        with model.context(n_ctx=4096, n_batch=4096, n_ubatch=16, n_threads=1) as ctx:
            # the abort comes from another thread once the prefill has produced a record (249 ubatches to go), not
            # after a delay that a fast machine would outlast
            running = threading.Event()
            aborter = threading.Thread(target=lambda: running.wait(60) and _native.lib().pt_request_abort(ctx._ptr))
            aborter.start()
            with pytest.raises(KeyboardInterrupt):
                ctx.prefill(prompt(4000), pipeline="force", on_ubatch=lambda rec: running.set())
            aborter.join()
            assert ctx.n_past == 0
            assert ctx.prefill(prompt(100), pipeline="force").path == "pipelined"


@pytest.mark.parametrize("pipeline,n_batch,victim", [("force", 8192, 1), ("off", 256, 0)], ids=["pipelined", "standard"])
def test_worker_killed_mid_prefill_raises_instead_of_aborting(pipeline, n_batch, victim):
    """In a subprocess: an abort of the interpreter would show as a signal exit instead of our message. The context
    is then clearly dead (every call says so) and can still be closed."""
    proc = run_python(f"""
        import time, threading, numpy as np, pyturbo
        from pyturbo import synth, workers
        path = synth.write_model("/tmp/pyturbo-kill-test-{victim}.gguf", synth.PRESETS["tiny"], seed=3)
        with workers.local(2, threads=1) as pool:
            model = pyturbo.Model(path, rpc_servers=pool.endpoints)
            ctx = model.context(n_ctx=8192, n_batch={n_batch}, n_ubatch=16, n_threads=1)

            def cpu_ticks(pid):
                return sum(int(x) for x in open(f"/proc/{{pid}}/stat").read().rsplit(")", 1)[1].split()[11:13])

            def kill_once_computing(pid, base):  # mid-prefill on any machine, not after a guessed delay
                while cpu_ticks(pid) == base:
                    time.sleep(0.002)
                pool.kill({victim})

            pid = pool.procs[{victim}].pid
            threading.Thread(target=kill_once_computing, args=(pid, cpu_ticks(pid)), daemon=True).start()
            t0 = time.monotonic()
            try:
                ctx.prefill(np.arange(8000) % 500, pipeline={pipeline!r})
                print("NO ERROR")
            except pyturbo.ContextDeadError as e:
                print("DEAD", round(time.monotonic() - t0, 1), e)
            try:
                ctx.prefill([1, 2, 3])
            except pyturbo.ContextDeadError:
                print("STILL DEAD")
            ctx.close(); model.close()
            print("CLOSED")
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "DEAD" in proc.stdout and "STILL DEAD" in proc.stdout and "CLOSED" in proc.stdout, proc.stdout + proc.stderr[-2000:]
    seconds = float(proc.stdout.split("DEAD", 1)[1].split()[0])
    assert seconds < 60


def test_repeated_pipelined_prefills_do_not_grow_memory(tiny_model, rpc3):
    with pyturbo.Model(tiny_model, rpc_servers=rpc3.endpoints[:2]) as model:
        with model.context(n_ctx=512, n_batch=512, n_ubatch=32, n_threads=1) as ctx:
            toks = prompt(300)
            for _ in range(5):  # warm up allocator pools
                ctx.reset()
                ctx.prefill(toks, pipeline="force")
            rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            for _ in range(40):
                ctx.reset()
                ctx.prefill(toks, pipeline="force")
            rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert rss1 - rss0 < 20 * 1024, f"peak RSS grew by {(rss1 - rss0) / 1024:.1f} MiB over 40 prefills"

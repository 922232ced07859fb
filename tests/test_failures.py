"""Every fault becomes a typed exception: dead and silent workers, threads, memory, workers, minor API.

Cases that aborted or hung the interpreter before run in a subprocess (run_python), so that a regression fails the
test instead of killing pytest; each has a time bound.
"""
from __future__ import annotations

import gc
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import pyturbo
from pyturbo import workers
from conftest import prompt, run_python



# ---- 1. a dead worker: no call aborts the process --------------------------------------------------------------------

def test_reset_after_a_worker_died_raises_instead_of_aborting(tiny_model):
    """reset() on a context whose worker died raises a typed error; nothing throws through the C boundary (which would
    abort the process)."""
    proc = run_python(f"""
        import numpy as np, pyturbo
        from pyturbo import workers
        pool = workers.WorkerPool(2, threads=1)
        m = pyturbo.Model({str(tiny_model)!r}, rpc_servers=pool.endpoints)
        c = m.context(n_ctx=512, n_batch=512, n_ubatch=32, n_threads=1)
        c.prefill(np.arange(100) % 500, pipeline="force")
        pool.kill(1)
        for call in (c.reset, c.logits, c.kv_state, lambda: c.prefill([1, 2])):
            try:
                call()
                print("NO ERROR")
            except pyturbo.ContextDeadError as e:
                print("DEAD", e)
        c.close(); m.close(); pool.stop()
        print("CLOSED")
    """, timeout=90)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("DEAD") == 4 and "NO ERROR" not in proc.stdout and "CLOSED" in proc.stdout, proc.stdout
    assert "127.0.0.1:" in proc.stdout.splitlines()[0]  # the worker is named


def test_a_dead_worker_makes_context_creation_a_context_dead_error(tiny_model):
    """A worker that died (as if OOM-killed) after the model was loaded: model.context() raises ContextDeadError naming
    the worker."""
    with workers.local(2) as pool:
        with pyturbo.Model(tiny_model, rpc_servers=pool.endpoints) as model:
            model.context(n_ctx=256, n_ubatch=32, n_threads=1).close()
            pool.kill(0)
            with pytest.raises(pyturbo.ContextDeadError, match=pool.endpoints[0]):
                model.context(n_ctx=256, n_ubatch=32, n_threads=1)


# ---- 2. a silent worker: timeouts with names, and Ctrl-C gets control back ------------------------------------------

def test_a_stopped_worker_times_out_naming_it(tiny_model):
    """A worker stopped (SIGSTOP) mid-prefill: with rpc_timeout the call raises ContextDeadError naming the worker after
    about rpc_timeout, instead of waiting forever."""
    with workers.local(2) as pool:
        with pyturbo.Model(tiny_model, rpc_servers=pool.endpoints, rpc_timeout=2) as model:
            with model.context(n_ctx=4096, n_batch=4096, n_ubatch=16, n_threads=1) as ctx:
                paused = []

                def pause_once(rec):
                    if not paused:
                        pool.pause(1)
                        paused.append(time.monotonic())

                try:
                    with pytest.raises(pyturbo.ContextDeadError, match=f"{pool.endpoints[1]}.*did not answer within 2.0 s"):
                        ctx.prefill(prompt(2000), pipeline="force", on_ubatch=pause_once)
                    assert time.monotonic() - paused[0] < 2 + 10
                finally:
                    pool.resume(1)
                with pytest.raises(pyturbo.ContextDeadError):
                    ctx.prefill(prompt(10))


def test_ctrl_c_returns_within_a_second_from_a_stopped_worker(tiny_model):
    """SIGINT while a worker is stopped: the call does not stay in the RPC receive; it returns in about a second and
    says the context is dead (a device was left mid-operation)."""
    proc = run_python(f"""
        import os, signal, threading, time, numpy as np, pyturbo
        from pyturbo import workers
        with workers.local(2) as pool:
            model = pyturbo.Model({str(tiny_model)!r}, rpc_servers=pool.endpoints)   # default rpc_timeout: minutes
            ctx = model.context(n_ctx=4096, n_batch=4096, n_ubatch=16, n_threads=1)
            sent = []

            def stall_then_interrupt(rec):
                if not sent:
                    pool.pause(1)
                    threading.Timer(0.5, lambda: (sent.append(time.monotonic()),
                                                  signal.pthread_kill(threading.main_thread().ident, signal.SIGINT))).start()
                    sent.append(None)

            try:
                ctx.prefill(np.arange(2000) % 500, pipeline="force", on_ubatch=stall_then_interrupt)
                print("NO ERROR")
            except pyturbo.ContextDeadError as e:
                print("DEAD after", round(time.monotonic() - sent[1], 2), "s:", e)
            pool.resume(1)
            try:
                ctx.kv_state()
            except pyturbo.ContextDeadError:
                print("STILL DEAD")
            ctx.close(); model.close()
            print("CLOSED")
    """, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "DEAD after" in proc.stdout and "STILL DEAD" in proc.stdout and "CLOSED" in proc.stdout, proc.stdout
    # nominally 2 * STOP_GRACE_S (1 s); the slack is for a loaded machine: what this guards against is the minutes
    # of the default rpc_timeout
    assert float(proc.stdout.split("DEAD after", 1)[1].split()[0]) < 3.0, proc.stdout


def test_a_server_that_never_answers_fails_the_handshake(tiny_model):
    """Model() against a server that accepts connections and never answers raises WorkerError naming it (no answer
    to the handshake) within rpc_timeout."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)  # the kernel completes connections; nobody reads them
        ep = f"127.0.0.1:{silent.getsockname()[1]}"
        t0 = time.monotonic()
        with pytest.raises(pyturbo.WorkerError, match=f"{ep}.*did not answer the handshake within 1.5 s"):
            pyturbo.Model(tiny_model, rpc_servers=[ep], rpc_timeout=1.5)
        assert time.monotonic() - t0 < 10


# ---- 4. threads ------------------------------------------------------------------------------------------------------

def test_a_second_thread_is_refused_while_a_prefill_runs(tiny_model):
    """A second thread calling into a context while a prefill runs there gets ContextBusyError; the process lives
    (llama.cpp would assert in its scheduler)."""
    proc = run_python(f"""
        import threading, numpy as np, pyturbo
        from pyturbo import workers
        with workers.local(2) as pool, pyturbo.Model({str(tiny_model)!r}, rpc_servers=pool.endpoints) as model:
            ctx = model.context(n_ctx=4096, n_batch=4096, n_ubatch=16, n_threads=1)
            running, tried = threading.Event(), threading.Event()
            outcome = []

            def second():
                running.wait(30)
                try:
                    for call in (lambda: ctx.prefill([1, 2, 3]), ctx.reset, ctx.kv_state, lambda: ctx.n_past):
                        try:
                            call()
                            outcome.append("RAN")
                        except pyturbo.ContextBusyError as e:
                            outcome.append("BUSY")
                finally:
                    tried.set()

            def on_ubatch(rec):
                if not running.is_set():
                    running.set()
                    tried.wait(30)   # the first call stays in progress until the second thread has tried

            t = threading.Thread(target=second)
            t.start()
            res = ctx.prefill(np.arange(1000) % 500, pipeline="force", on_ubatch=on_ubatch)
            t.join()
            print(outcome, ctx.n_past)
    """, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "['BUSY', 'BUSY', 'BUSY', 'BUSY'] 1000" in proc.stdout, proc.stdout


@pytest.mark.parametrize("closer", ["context", "model"])
def test_close_from_another_thread_stops_the_prefill(tiny_model, closer):
    """ctx.close() or model.close() from another thread during a prefill stops the prefill (ValueError in its thread)
    and then frees everything, without a crash."""
    proc = run_python(f"""
        import threading, time, numpy as np, pyturbo
        from pyturbo import workers
        with workers.local(2) as pool:
            model = pyturbo.Model({str(tiny_model)!r}, rpc_servers=pool.endpoints)
            ctx = model.context(n_ctx=8192, n_batch=8192, n_ubatch=16, n_threads=1)
            started = threading.Event()
            closed = []

            def closer():
                started.wait(30)
                t0 = time.monotonic()
                {"ctx" if closer == "context" else "model"}.close()
                closed.append(time.monotonic() - t0)

            t = threading.Thread(target=closer)
            t.start()
            try:
                ctx.prefill(np.arange(8000) % 500, pipeline="force", on_ubatch=lambda rec: started.set())
                print("NO ERROR")
            except ValueError as e:
                print("STOPPED", e)
            t.join()
            print("CLOSED in", round(closed[0], 2), ctx.closed, model.closed)
            try:
                ctx.prefill([1])
            except ValueError as e:
                print("AFTER", e)
            model.close()
    """, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "STOPPED" in proc.stdout and "AFTER the context is closed" in proc.stdout, proc.stdout
    assert f"True {closer == 'model'}" in proc.stdout
    assert float(proc.stdout.split("CLOSED in", 1)[1].split()[0]) < 5, proc.stdout


# ---- 5. memory checked before it is asked for ------------------------------------------------------------------------

@pytest.mark.parametrize("n_ctx", [500_000_000, 10**9])
def test_a_huge_context_is_refused_before_allocating(tiny_model, n_ctx):
    """A huge n_ctx is refused (MemoryError) before anything is allocated: neither an OOM kill nor many GB allocated
    first."""
    proc = run_python(f"""
        import resource, time, pyturbo
        # a safety net: should the check ever let a huge context through, the allocation fails here instead of the
        # OOM killer taking this (shared) machine's memory
        resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))
        t0 = time.monotonic()
        with pyturbo.Model({str(tiny_model)!r}, devices=[]) as model:
            try:
                model.context(n_ctx={n_ctx}, n_threads=1)
                print("NO ERROR")
            except MemoryError as e:
                print("REFUSED in", round(time.monotonic() - t0, 1), "s:", e)
        print("RSS MiB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
    """, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "REFUSED in" in proc.stdout and "GiB" in proc.stdout and "Lower n_ctx" in proc.stdout, proc.stdout
    assert float(proc.stdout.split("REFUSED in", 1)[1].split()[0]) < 20
    assert int(proc.stdout.split("RSS MiB", 1)[1].split()[0]) < 1024


def test_a_context_too_large_for_the_workers_is_refused_and_they_live(tiny_model):
    """n_ctx=30M over 2 workers is refused with MemoryError saying what to lower; the workers live and the model stays
    usable."""
    with workers.local(2) as pool:
        with pyturbo.Model(tiny_model, rpc_servers=pool.endpoints) as model:
            with pytest.raises(MemoryError, match=r"n_ctx=30000000.*GiB.*Lower n_ctx"):
                model.context(n_ctx=30_000_000, n_threads=1)
            assert all(p.poll() is None for p in pool.procs)
            with model.context(n_ctx=256, n_ubatch=32, n_threads=1) as ctx:
                assert ctx.prefill(prompt(100), pipeline="force").path == "pipelined"


def test_memory_plan_names_each_device_and_what_to_lower(tiny_model, monkeypatch):
    """The per-device check: with the workers' memory made small, a context that the machine could hold is refused
    with the numbers of each device; and a context that fits but whose pipeline buffers would not runs standard."""
    from pyturbo import _memory
    real = _memory.device_memory
    with workers.local(2) as pool:
        with pyturbo.Model(tiny_model, rpc_servers=pool.endpoints) as model:
            needs = model.memory_plan.needs(65536, 512, 512, -1)
            worker_need = max(n["context"] + n["compute"] for d, n in needs.items() if d != _memory.HOST)
            monkeypatch.setattr(_memory, "device_memory", lambda d: (worker_need, 1 << 50) if d != _memory.HOST else real(d))
            with pytest.raises(MemoryError, match=r"RPC\d+ \(127\.0\.0\.1:\d+\) needs [\d.]+ GiB \(RPC\d+ [\d.]+ GiB \(KV"):
                model.context(n_ctx=65536, n_batch=512, n_ubatch=512, n_threads=1)
            # fits once (a tenth more than the need), not three times over: the pipeline falls back
            monkeypatch.setattr(_memory, "device_memory", lambda d: (int(worker_need * 1.2), 1 << 50) if d != _memory.HOST else real(d))
            with model.context(n_ctx=65536, n_batch=512, n_ubatch=512, n_threads=1) as ctx:
                res = ctx.prefill(prompt(1100), pipeline="force")
                assert res.path == "standard" and "ubatches in flight" in res.fallback_reason and "max_in_flight" in res.fallback_reason
            monkeypatch.setattr(_memory, "device_memory", real)
            with model.context(n_ctx=2048, n_batch=512, n_ubatch=512, n_threads=1) as ctx:
                assert ctx.prefill(prompt(1100), pipeline="force").path == "pipelined"


# ---- 6. workers that cannot be confused ------------------------------------------------------------------------------

def test_worker_exits_nonzero_when_it_cannot_bind():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        busy = subprocess.run([sys.executable, "-m", "pyturbo.worker", "--port", str(port)], capture_output=True,
                              text=True, timeout=60)
    assert busy.returncode == 1 and "Address already in use" in busy.stderr and "--port" in busy.stderr
    # (with a secret: a non-loopback address without one is refused before binding, tests/test_rpc_auth.py)
    bad = subprocess.run([sys.executable, "-m", "pyturbo.worker", "--port", "0", "--host", "300.1.2.3"],
                         capture_output=True, text=True, timeout=60, env=dict(os.environ, PYTURBO_RPC_TOKEN="s"))
    assert bad.returncode == 1 and "cannot listen on 300.1.2.3:0" in bad.stderr


def test_worker_with_port_0_reports_the_port_it_listens_on():
    proc = subprocess.Popen([sys.executable, "-m", "pyturbo.worker", "--port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        port = workers.read_port(proc, open(os.devnull, "rb"), 60)
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_worker_pool_takes_ports_from_its_workers_and_a_dropped_pool_stops_them(tiny_model):
    pool = workers.WorkerPool(2)
    assert all(p.args[p.args.index("--port") + 1] == "0" for p in pool.procs)  # no port chosen for them
    with pyturbo.Model(tiny_model, rpc_servers=pool.endpoints) as model:
        assert len(model.devices) == 2 and all(d.startswith("RPC") for d in model.devices)
    procs = list(pool.procs)
    del pool
    gc.collect()
    for p in procs:
        p.wait(timeout=10)


def test_pause_resume_restart(tiny_model):
    with workers.local(2) as pool:
        def state():
            return open(f"/proc/{pool.procs[0].pid}/stat").read().split()[2]

        pool.pause(0)
        deadline = time.monotonic() + 5
        while state() != "T" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert state() == "T"
        pool.resume(0)
        old_pid, old_ep = pool.procs[1].pid, pool.endpoints[1]
        pool.restart(1)
        assert pool.procs[1].pid != old_pid and pool.endpoints[1] == old_ep
        with pyturbo.Model(tiny_model, rpc_servers=pool.endpoints) as model:
            with model.context(n_ctx=256, n_ubatch=32, n_threads=1) as ctx:
                assert ctx.prefill(prompt(80), pipeline="force").path == "pipelined"


# ---- 8. minor API ----------------------------------------------------------------------------------------------------

def test_minor_api_errors(tiny_model, tmp_path):
    """Misuse of the small API surface raises ValueError or ModelLoadError saying what is wrong: a truncated file,
    an endpoint or device listed twice, a bad endpoint type, bad rpc_timeout values, an n_ctx C cannot hold, calls on a
    closed model."""
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(open(tiny_model, "rb").read()[:300])
    with workers.local(2) as pool:
        with pytest.raises(pyturbo.ModelLoadError, match="damaged or truncated"):
            pyturbo.Model(corrupt, rpc_servers=pool.endpoints, tensor_split="even")
        with pytest.raises(ValueError, match="listed twice"):
            pyturbo.Model(tiny_model, rpc_servers=[pool.endpoints[0], pool.endpoints[0]])
        with pytest.raises(ValueError, match="lists a device twice"):
            pyturbo.Model(tiny_model, devices=["CPU", "CPU"])
    with pytest.raises(ValueError, match="must be a 'host:port' string"):
        pyturbo.Model(tiny_model, rpc_servers=[5])
    for bad in (0, -1, "5", True):
        with pytest.raises(ValueError, match="rpc_timeout"):
            pyturbo.Model(tiny_model, rpc_timeout=bad)
    model = pyturbo.Model(tiny_model, devices=[])
    with pytest.raises(ValueError, match="n_ctx must be at most"):
        model.context(n_ctx=2**32 + 512)  # would wrap around in C
    model.close()
    with pytest.raises(ValueError, match="the model is closed"):
        model.tokenize("hello")
    with pytest.raises(ValueError, match="the model is closed"):
        model.context()


def test_logits_and_kv_state_of_a_dead_context_say_dead(tiny_model):
    with workers.local(2) as pool:
        with pyturbo.Model(tiny_model, rpc_servers=pool.endpoints) as model:
            with model.context(n_ctx=4096, n_batch=4096, n_ubatch=16, n_threads=1) as ctx:
                ctx.prefill(prompt(50))
                pool.kill(1)
                with pytest.raises(pyturbo.ContextDeadError):
                    ctx.prefill(prompt(2000), pipeline="force")
                for call in (ctx.logits, ctx.kv_state, ctx.reset):
                    with pytest.raises(pyturbo.ContextDeadError, match=pool.endpoints[1]):
                        call()

"""Fault injection: short pipelined and standard prefills on 3 local workers while, at a seeded random
moment, a worker is killed, stopped (SIGSTOP) or restarted, or SIGINT reaches the main thread (also while a worker is
stopped).

Every outcome must be one of: the correct logits (equal to a fresh run's), KeyboardInterrupt with the context as it
was (nothing added to the fresh context), ContextDeadError or WorkerError. Each call must end within rpc_timeout plus
a margin. Afterwards a model on fresh workers must give the reference logits. The process must not die: tests/
test_faults.py runs this in a subprocess and checks its exit code and the JSON summary on its last line.

    python tests/fault_injection.py --model tiny.gguf --seed 13 --iterations 24 --budget 150
"""
from __future__ import annotations

import argparse
import collections
import json
import random
import signal
import sys
import threading
import time

import numpy as np

import pyturbo
from pyturbo import workers

RPC_TIMEOUT = 1.5  # a stopped worker is declared dead after this
CALL_BOUND = RPC_TIMEOUT + 8.0  # no call may take longer (2-core machines shared with other work are slow)
EXPECTED = (pyturbo.ContextDeadError, pyturbo.WorkerError, KeyboardInterrupt)
FAULTS = ["none", "kill", "pause", "restart", "sigint", "sigint", "pause+sigint"]
N_WORKERS = 3


class Sigint:
    """SIGINT raises KeyboardInterrupt only while a prefill call is in progress, as a user's Ctrl-C during it would;
    one that lands outside (the call already returned) is counted and ignored."""

    def __init__(self):
        self.armed = False
        self.late = 0
        signal.signal(signal.SIGINT, self._handler)

    def _handler(self, signum, frame):
        if self.armed:
            raise KeyboardInterrupt("fault injection")
        self.late += 1


def prompts() -> list[np.ndarray]:
    return [np.random.default_rng(i).integers(0, 500, n).astype(np.int32) for i, n in enumerate((300, 500, 700, 1000))]


def context(model):
    return model.context(n_ctx=1024, n_batch=1024, n_ubatch=16, n_threads=1)


def reference(path: str, toks: list[np.ndarray], pipeline) -> tuple[list[np.ndarray], list[float]]:
    """Logits of each prompt in a fresh context on fresh workers, and how long each call took (a fault is timed
    relative to that: a fixed delay would land after the call on a fast machine and rarely before its end on a slow
    one)."""
    out, seconds = [], []
    with workers.local(N_WORKERS) as pool, pyturbo.Model(path, rpc_servers=pool.endpoints) as model:
        for t in toks:
            with context(model) as ctx:
                t0 = time.monotonic()
                out.append(ctx.prefill(t, pipeline=pipeline).logits)
                seconds.append(time.monotonic() - t0)
    return out, seconds


def inject(fault: str, pool: workers.WorkerPool, victim: int) -> None:
    if fault == "kill":
        pool.kill(victim)
    elif fault == "pause":
        pool.pause(victim)
    elif fault == "restart":
        pool.restart(victim)
    elif fault == "sigint":
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
    elif fault == "pause+sigint":  # Ctrl-C while the call waits for a stopped worker (rpc_timeout not reached)
        pool.pause(victim)
        time.sleep(0.3)
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)


def heal(pool: workers.WorkerPool) -> None:
    """Every worker alive and running again (a paused one continued, a dead one restarted on its port)."""
    for k, proc in enumerate(pool.procs):
        if proc.poll() is None:
            pool.resume(k)
        else:
            pool.restart(k)


def run(path: str, seed: int, iterations: int, budget: float) -> dict:
    rng = random.Random(seed)
    toks = prompts()
    refs, standard_s = reference(path, toks, pipeline=False)
    call_s = {False: standard_s, True: reference(path, toks, pipeline=True)[1]}
    sigint = Sigint()
    outcomes: collections.Counter = collections.Counter()
    failures: list[str] = []
    slowest = 0.0
    deadline = time.monotonic() + budget
    model = None
    done = 0
    with workers.local(N_WORKERS) as pool:
        while done < iterations and time.monotonic() < deadline:
            if model is None:
                heal(pool)
                model = pyturbo.Model(path, rpc_servers=pool.endpoints, rpc_timeout=RPC_TIMEOUT)
            p, pipeline = rng.randrange(len(toks)), rng.random() < 0.6
            # the fault lands within the call's duration (measured above) most of the time, after it sometimes
            fault, delay, victim = rng.choice(FAULTS), rng.uniform(0.0, 1.25) * call_s[pipeline][p], rng.randrange(N_WORKERS)
            label = f"#{done} {fault}@{delay:.2f}s worker {victim} {'pipelined' if pipeline else 'standard'} {len(toks[p])}"
            ctx = context(model)
            timer = threading.Timer(delay, inject, args=(fault, pool, victim))
            t0 = time.monotonic()
            try:
                sigint.armed = True
                timer.start()
                res = ctx.prefill(toks[p], pipeline=pipeline)
                sigint.armed = False
                outcome = "logits"
                if not np.array_equal(res.logits, refs[p]) or ctx.n_past != len(toks[p]):
                    failures.append(f"{label}: wrong result (n_past {ctx.n_past})")
            except EXPECTED as e:
                sigint.armed = False
                outcome = type(e).__name__
                if isinstance(e, KeyboardInterrupt) and ctx.n_past != 0:
                    failures.append(f"{label}: KeyboardInterrupt but {ctx.n_past} tokens stayed in the cache")
            except BaseException as e:  # anything else is a failure of the contract
                sigint.armed = False
                outcome = "other"
                failures.append(f"{label}: {type(e).__name__}: {e}")
            finally:
                sigint.armed = False
                timer.cancel()
                timer.join()
            seconds = time.monotonic() - t0
            slowest = max(slowest, seconds)
            if seconds > CALL_BOUND + delay:
                failures.append(f"{label}: took {seconds:.1f} s")
            outcomes[outcome] += 1
            outcomes[f"fault:{fault}"] += 1
            print(f"{label}: {outcome} in {seconds:.2f} s", file=sys.stderr, flush=True)
            ctx.close()
            if fault in ("kill", "pause", "restart", "pause+sigint") or outcome in ("ContextDeadError", "WorkerError"):
                model.close()  # its workers were disturbed: a new model on healed workers
                model = None
            done += 1
        if model is not None:
            model.close()
    # a model on fresh workers gives the reference logits, on both paths
    final_ok = all(np.array_equal(a, b) for a, b in zip(reference(path, toks, pipeline="force")[0], refs))
    return {"iterations": done, "outcomes": dict(outcomes), "failures": failures, "final_ok": final_ok,
            "slowest_call_s": round(slowest, 2), "late_sigints": sigint.late}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--seed", type=int, default=13)
    ap.add_argument("--iterations", type=int, default=24)
    ap.add_argument("--budget", type=float, default=150.0, help="seconds for the faulty prefills")
    args = ap.parse_args()
    summary = run(args.model, args.seed, args.iterations, args.budget)
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

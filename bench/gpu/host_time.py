"""Where the host's time goes in a short pipelined prefill over several GPUs, and what this process's CPU backend costs.

For each CPU setting (threads of the CPU backend, which on an all-GPU layout only looks up the token embeddings, and
its threadpool's polling level, PYTURBO_CPU_POLL), in one process with both models loaded: the prompt on one GPU
(llama.cpp's path, llama-server's batch sizes) and over all visible GPUs (pipeline forced), interleaved round by round,
medians. Printed per setting: tok/s of both, their ratio, PrefillResult.host_times and, from the timeline of the median
pipelined run, when the first stage started and how long the embedding lookups took. Then one pipelined run per
setting with LLAMA_TURBO_TRACE set prints the host's checkpoints (which thread did what, when).

    GGML_CUDA_P2P=1 python3 bench/gpu/host_time.py --tokens 2048 --threads 0,8,2 --polls 50,0
"""
from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys

import numpy as np

import pyturbo
from pyturbo import synth
from pyturbo.devices import list_devices, usable_cpu_cores

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--preset", default="8b")
ap.add_argument("--tokens", default="2048", help="comma-separated prompt lengths")
ap.add_argument("--ubatch", type=int, default=512)
ap.add_argument("--threads", default="0,8,2", help="CPU backend threads to compare (0: pyturbo's default)")
ap.add_argument("--polls", default="50,0", help="threadpool polling levels to compare (50: ggml's default)")
ap.add_argument("--repeat", type=int, default=5)
ap.add_argument("--no-trace", action="store_true")
args = ap.parse_args()

gpus = [d.name for d in list_devices() if d.name.startswith("CUDA")]
if len(gpus) < 2:
    sys.exit(f"needs two or more CUDA devices, found {gpus}")
path = synth.cached_model(args.preset, progress=True)
lengths = [int(x) for x in args.tokens.split(",")]
cpu_settings = list(itertools.product([int(t) or usable_cpu_cores() for t in args.threads.split(",")],
                                      [int(p) for p in args.polls.split(",")]))
print(f"{len(gpus)} GPUs, {args.preset}, ubatch {args.ubatch}, usable cores {usable_cpu_cores()}, "
      f"GGML_CUDA_P2P={os.environ.get('GGML_CUDA_P2P', '')}")


def open_context(model, n, threads, poll):
    os.environ["PYTURBO_CPU_POLL"] = str(poll)  # read when the context makes its threadpool
    return model.context(n_ctx=n + 64, n_batch=2048, n_ubatch=args.ubatch, n_threads=threads, flash_attn=True)


def first_stage_start_ms(res) -> float:
    a = res.timeline.array
    return 1e3 * float(a["start"][a["stage"] == 0].min())


def embedding_ms(res) -> list[float]:
    a = res.timeline.array
    other = a[a["stage"] < 0]
    return [round(1e3 * float(e - s), 2) for s, e in zip(other["start"], other["end"])]


with pyturbo.Model(path, devices=[gpus[0]]) as one, pyturbo.Model(path, devices=gpus) as split:
    for n in lengths:
        tokens = np.random.default_rng(n).integers(0, 32000, n).astype(np.int32)
        runs = {}
        contexts = {}
        for threads, poll in cpu_settings:
            for name, model, pipeline in (("1 GPU", one, False), ("pipelined", split, "force")):
                ctx = open_context(model, n, threads, poll)
                for _ in range(2):   # warm-up: first-use allocations, graph reuse from the second prompt on
                    ctx.reset()
                    ctx.prefill(tokens, pipeline=pipeline)
                contexts[(threads, poll, name)] = (ctx, pipeline)
                runs[(threads, poll, name)] = []
        keys = list(contexts)
        for r in range(args.repeat):
            for key in keys[r % len(keys):] + keys[:r % len(keys)]:
                ctx, pipeline = contexts[key]
                ctx.reset()
                runs[key].append(ctx.prefill(tokens, pipeline=pipeline))
        print(f"\n{n} tokens, medians of {args.repeat} (interleaved)")
        print(f"{'threads':>7} {'poll':>4} {'1 GPU tok/s':>11} {'pipelined':>10} {'ratio':>6} {'first stage at':>14}"
              f" {'until 1st ub':>12} {'1st graph':>9} {'graphs':>7}  embedding lookups (ms)")
        for threads, poll in cpu_settings:
            ref = statistics.median(r.seconds for r in runs[(threads, poll, "1 GPU")])
            pip = runs[(threads, poll, "pipelined")]
            med = statistics.median(r.seconds for r in pip)
            mid = min(pip, key=lambda r: abs(r.seconds - med))
            h = mid.host_times
            print(f"{threads:7d} {poll:4d} {n / ref:11.0f} {n / med:10.0f} {ref / med:5.2f}x "
                  f"{first_stage_start_ms(mid):11.2f} ms {1e3 * h['until_first_ubatch']:9.2f} ms "
                  f"{1e3 * h['first_graph']:6.2f} ms {1e3 * h['graphs']:4.1f} ms  {embedding_ms(mid)}")
        for ctx, _ in contexts.values():
            ctx.close()
        if args.no_trace:
            continue
        for threads, poll in cpu_settings:
            print(f"\n-- host trace, {n} tokens, {threads} threads, poll {poll} (third prefill of a fresh context)",
                  flush=True)
            with open_context(split, n, threads, poll) as ctx:
                for i in range(3):
                    ctx.reset()
                    if i == 2:
                        os.environ["LLAMA_TURBO_TRACE"] = "1"  # read as a replay starts
                    res = ctx.prefill(tokens, pipeline="force")
                os.environ.pop("LLAMA_TURBO_TRACE")
                sys.stderr.flush()
            print(res.timeline.ascii(100), flush=True)

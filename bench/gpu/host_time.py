"""Where the time goes in a short pipelined prefill over several GPUs: host work, hand-overs, stage balance.

In one process, interleaved round by round (medians of --repeat): the prompt on one GPU (llama.cpp's path,
llama-server's batch sizes) and the forced pipeline over all visible GPUs, on an even layer split and on
tensor_split="auto" (measured and balanced once, pyturbo.balance), with the CPU backend's threads (--threads) and
the stage threads' spinning (LLAMA_TURBO_SPIN, read as each replay starts) off and on, and with a smaller first
ubatch (--first-ubatch; the largest logit difference to the one-GPU run is printed). Printed per setting: tok/s, the ratio to one GPU, PrefillResult.host_times
and, from the timeline of the median run, when the first stage started and each stage's mean time per ubatch.
Then one run per pipelined setting with LLAMA_TURBO_TRACE set prints the host's checkpoints (which thread did what,
when) to stderr.

    GGML_CUDA_P2P=1 python3 bench/gpu/host_time.py --tokens 2048,8192
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from contextlib import ExitStack

import numpy as np

import pyturbo
from pyturbo import synth
from pyturbo.devices import list_devices, usable_cpu_cores
from pyturbo.tools.bench.measure import bench_tokens, round_order

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--preset", default="8b")
ap.add_argument("--tokens", default="2048", help="comma-separated prompt lengths")
ap.add_argument("--ubatch", type=int, default=512, help="n_ubatch of the pipelined contexts")
ap.add_argument("--ref-ubatch", type=int, default=512, help="n_ubatch of the one-GPU reference (llama-server's)")
ap.add_argument("--splits", default="even", help="tensor splits of the pipelined model to compare (even, auto)")
ap.add_argument("--threads", default="0", help="CPU backend threads of the pipelined contexts (0: pyturbo's default)")
ap.add_argument("--spin", default="0,1", help="LLAMA_TURBO_SPIN values to compare")
ap.add_argument("--first-ubatch", default="0", help="Context(first_ubatch=) values to compare (0: uniform ubatches)")
ap.add_argument("--repeat", type=int, default=5)
ap.add_argument("--no-trace", action="store_true")
args = ap.parse_args()

gpus = [d.name for d in list_devices() if d.name.startswith("CUDA")]
if len(gpus) < 2:
    sys.exit(f"needs two or more CUDA devices, found {gpus}")
path = synth.cached_model(args.preset, progress=True)
lengths = [int(x) for x in args.tokens.split(",")]
print(f"{len(gpus)} GPUs, {args.preset}, ubatch {args.ubatch}, usable cores {usable_cpu_cores()}, "
      f"GGML_CUDA_P2P={os.environ.get('GGML_CUDA_P2P', '')}", flush=True)


def prefill(ctx, tokens, pipeline, spin):
    ctx.reset()
    os.environ["LLAMA_TURBO_SPIN"] = spin
    try:
        return ctx.prefill(tokens, pipeline=pipeline)
    finally:
        os.environ.pop("LLAMA_TURBO_SPIN")


def stage_ms(res) -> str:
    """Mean time per ubatch of each stage (from the records), and when the first stage started."""
    a = res.timeline.array
    per = [1e3 * float(np.mean(a["end"][a["stage"] == s] - a["start"][a["stage"] == s]))
           for s in range(len(res.timeline.stages))]
    first = 1e3 * float(a["start"][a["stage"] == 0].min())
    return f"first stage at {first:.2f} ms, per ubatch " + " / ".join(f"{t:.2f}" for t in per) + " ms"


with ExitStack() as stack:
    one = stack.enter_context(pyturbo.Model(path, devices=[gpus[0]]))
    models = {}
    for split in args.splits.split(","):
        models[split] = stack.enter_context(pyturbo.Model(path, devices=gpus, tensor_split=split))
        print(f"split {split}: layers {models[split].layers_per_stage} ({models[split].split_choice})", flush=True)
    for n in lengths:
        tokens = bench_tokens(one.n_vocab, n)   # the bench's prompts
        settings = {"1 GPU": (one, False, "0", 0, 0)}
        for split, model in models.items():
            for threads in map(int, args.threads.split(",")):
                for spin in args.spin.split(","):
                    for first in map(int, args.first_ubatch.split(",")):
                        name = f"{split}, {threads or 'default'} thr, spin {spin}" + (f", first {first}" if first else "")
                        settings[name] = (model, "force", spin, threads, first)
        contexts = {}
        for name, (model, pipeline, spin, threads, first) in settings.items():
            ub = args.ref_ubatch if name == "1 GPU" else args.ubatch
            ctx = stack.enter_context(model.context(n_ctx=n + 64, n_batch=2048, n_ubatch=ub, flash_attn=True,
                                                    n_threads=threads or None, first_ubatch=first or None))
            for _ in range(2):   # warm-up: first-use allocations, graph reuse from the second prompt on
                prefill(ctx, tokens, pipeline, spin)
            contexts[name] = ctx
        runs = {name: [] for name in settings}
        names = list(settings)
        for r in range(args.repeat):
            for name in round_order(names, r):   # the bench's rotation: no setting always follows the same one
                model, pipeline, spin, _, _ = settings[name]
                runs[name].append(prefill(contexts[name], tokens, pipeline, spin))
        ref = statistics.median(r.seconds for r in runs["1 GPU"])
        print(f"\n{n} tokens, ubatch {args.ubatch} (1 GPU: {args.ref_ubatch}), medians of {args.repeat} (interleaved)")
        print(f"  {'1 GPU':<28} {n / ref:8.0f} tok/s ({contexts['1 GPU'].n_threads} CPU threads; largest |logit| "
              f"{float(np.abs(runs['1 GPU'][0].logits).max()):.3g})")
        for name in names[1:]:
            med = statistics.median(r.seconds for r in runs[name])
            lo, hi = min(r.seconds for r in runs[name]), max(r.seconds for r in runs[name])
            mid = min(runs[name], key=lambda r: abs(r.seconds - med))
            h = mid.host_times
            print(f"  {name:<28} {n / med:8.0f} tok/s ({n / hi:.0f}-{n / lo:.0f}), {ref / med:.2f}x one GPU; "
                  f"host: until 1st ubatch {1e3 * h['until_first_ubatch']:.2f} ms, 1st graph "
                  f"{1e3 * h['first_graph']:.2f} ms; {stage_ms(mid)}; max |d logit| vs 1 GPU "
                  f"{float(np.abs(mid.logits - runs['1 GPU'][0].logits).max()):.3g}", flush=True)
        if not args.no_trace:
            for name in names[1:]:
                model, pipeline, spin, _, _ = settings[name]
                print(f"-- host trace on stderr: {n} tokens, {name}", flush=True)
                print(f"-- host trace, {n} tokens, {name}", file=sys.stderr, flush=True)
                os.environ["LLAMA_TURBO_TRACE"] = "1"
                res = prefill(contexts[name], tokens, pipeline, spin)
                os.environ.pop("LLAMA_TURBO_TRACE")
                sys.stderr.flush()
                print(res.timeline.ascii(100), flush=True)
        for ctx in contexts.values():
            ctx.close()

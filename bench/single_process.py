"""The reference ceiling for the CPU RPC runs: the same model in one process with all threads, no split."""
from __future__ import annotations

import argparse

import numpy as np

import pyturbo
from pyturbo import synth

ap = argparse.ArgumentParser(description=__doc__)
ap.add_argument("--preset", default="bench-16l")
ap.add_argument("--threads", type=int, default=16)
ap.add_argument("--lengths", default="4096")
ap.add_argument("--ubatch", type=int, default=512)
args = ap.parse_args()

path = synth.cached_model(args.preset)
with pyturbo.Model(path) as model:
    for n in map(int, args.lengths.split(",")):
        toks = np.random.default_rng(n).integers(0, 32000, n).astype(np.int32)
        with model.context(n_ctx=n + 64, n_batch=n, n_ubatch=args.ubatch, n_threads=args.threads) as ctx:
            ctx.prefill(toks[:64])
            ctx.reset()
            res = ctx.prefill(toks)
        print(f"single process, {args.threads} threads, {args.preset}, {n} tokens, ub {args.ubatch}: "
              f"{res.tokens_per_second:.0f} tok/s")

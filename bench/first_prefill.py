"""A context's first pipelined prefills against later ones, on the server reference's layout.

    python bench/first_prefill.py                       # 1500 and 6000 tokens, each on 4 sequences, twice
    python bench/first_prefill.py --lengths 1500 --runs 3

The server's slots are the sequences of one context with a KV cache split per sequence (BatchedGenerator). This
opens such a context (4 sequences of 8192 cells, n_batch 8192, n_ubatch 512) on the server bench's model over 4 local
RPC workers x 1 thread, warms it as BatchedGenerator.calibrate does (a 1024-token prefill on each path), then prefills
each length on each sequence --runs times, pipelined (forced), and prints each run's tok/s and its ratio to the
median of the later runs of that length. A first run below the later ones is time the first user pays (issue 23: a
first 1500-token prefill ran at 0.6-0.8x the next, from RPC round trips made while ubatches were in flight and from
worker memory faulted in by the first graphs: patches/0014, turbo-slots.cpp presize_shapes).
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time

import numpy as np


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="1500,6000", help="prompt lengths (default 1500,6000)")
    ap.add_argument("--sequences", type=int, default=4, help="sequences of the context (default 4)")
    ap.add_argument("--runs", type=int, default=2, help="prefills per length and sequence (default 2)")
    args = ap.parse_args(argv)
    from pyturbo import Model, policy, synth, workers
    from pyturbo.model import even_layer_split
    lengths = [int(x) for x in args.lengths.split(",")]
    shape = dataclasses.replace(synth.PRESETS["bench-8l"], n_vocab=synth.tiny_vocab_size())
    path = synth.cached_model(shape, vocab="tiny", chat_template=synth.TINY_CHAT_TEMPLATE, progress=True)
    rng = np.random.default_rng(0)
    n_seq = args.sequences
    with policy.calibration_scope(policy.Calibration(None)), workers.local(4, threads=1) as pool, \
            Model(str(path), rpc_servers=pool.endpoints, tensor_split=even_layer_split(shape.n_layer, 4)) as model, \
            model.context(n_ctx=n_seq * 8192, n_seq=n_seq, n_batch=8192, n_ubatch=512, n_threads=1,
                          kv_unified=False) as ctx:
        warm = rng.integers(0, model.n_vocab, 1024).astype(np.int32)
        for mode in ("force", "off"):   # BatchedGenerator.calibrate's warm-up
            ctx.prefill(warm, pipeline=mode)
            ctx.reset()
        for n in lengths:
            speeds = []
            for seq in range(n_seq):
                for run in range(args.runs):
                    t0 = time.perf_counter()
                    res = ctx.prefill(rng.integers(0, model.n_vocab, n).astype(np.int32), pipeline="force", seq=seq)
                    speeds.append((seq, run, res.path, n / (time.perf_counter() - t0)))
                    ctx.truncate(0, seq=seq)
            later = statistics.median(tps for seq, run, _, tps in speeds if (seq, run) != (0, 0))
            for seq, run, path, tps in speeds:
                print(f"{n} tokens, sequence {seq}, run {run + 1}: {path} {tps:.0f} tok/s ({tps / later:.2f}x the "
                      f"median of the later runs)", flush=True)


if __name__ == "__main__":
    sys.exit(main())

"""Where gpt-oss-20b's experts live when they are kept in host memory, and how they reach the GPU (issue 24, item 4).

    LD_PRELOAD=/tmp/h2d_count.so PYTURBO_GPU_STREAMS=1 python3 bench/gpu/host_experts_probe.py --mode off
    LD_PRELOAD=/tmp/h2d_count.so PYTURBO_GPU_STREAMS=4 python3 bench/gpu/host_experts_probe.py --mode force

Loads the model with Model(experts_in_host_memory=True) and prints llama.cpp's load lines that say which buffer type
the weights went to (" model buffer size", the first "buffer type overridden" lines, any failure to pin), then times
--repeat prefills of --tokens tokens at ubatch --ubatch after an untimed one. With bench/gpu/h2d_count.cpp preloaded
it prints, for each timed prefill, the host-to-device copies it made by the kind of host memory they read (pinned or
pageable), their sizes and the host time inside the copy calls, and the rate bytes / prefill time.
"""
from __future__ import annotations

import argparse
import ctypes
import logging
import sys
import time

import numpy as np

import pyturbo
from pyturbo import _native
from pyturbo import synth

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--preset", default="gpt-oss-20b")
ap.add_argument("--tokens", type=int, default=4096)
ap.add_argument("--ubatch", type=int, default=2048)
ap.add_argument("--mode", default="off", help="pipeline= of the timed prefills (off, force, auto)")
ap.add_argument("--repeat", type=int, default=2)
args = ap.parse_args()


class LoadLines(logging.Filter):
    overridden = 0

    def filter(self, rec: logging.LogRecord) -> bool:
        msg = rec.getMessage()
        if "overridden" in msg:
            self.overridden += 1
            return self.overridden <= 4
        return any(k in msg for k in ("buffer size", "pinned", "failed", "CUDA_Host", "host buffer"))


handler = logging.StreamHandler(sys.stdout)
handler.addFilter(LoadLines())
handler.setFormatter(logging.Formatter("llama.cpp: %(message)s"))
llama_log = logging.getLogger("pyturbo.llama")
llama_log.setLevel(logging.DEBUG)
llama_log.addHandler(handler)

try:
    counter = ctypes.CDLL(None)
    counter.h2d_count_report.argtypes = [ctypes.c_char_p]
    counter.h2d_count_reset  # noqa: B018 (present?)
except (AttributeError, OSError):
    counter = None
print(f"h2d_count preloaded: {counter is not None}", flush=True)

path = synth.cached_model(args.preset, progress=True)
t0 = time.perf_counter()
with pyturbo.Model(path, experts_in_host_memory=True) as model:
    _native.drain_log()
    print(f"loaded in {time.perf_counter() - t0:.1f} s on {model.devices}", flush=True)
    tokens = np.random.default_rng(args.tokens).integers(0, model.n_vocab, args.tokens).astype(np.int32)
    with model.context(n_ctx=args.tokens + 64, n_batch=max(args.ubatch, min(args.tokens, 8192)), n_ubatch=args.ubatch,
                       flash_attn=True) as ctx:
        ctx.prefill(tokens, pipeline=args.mode)
        _native.drain_log()
        for i in range(args.repeat):
            ctx.reset()
            if counter:
                counter.h2d_count_reset()
            t1 = time.perf_counter()
            res = ctx.prefill(tokens, pipeline=args.mode)
            seconds = time.perf_counter() - t1
            sys.stdout.flush()
            if counter:
                counter.h2d_count_report(f"prefill {i + 1}, {args.tokens} tokens, ubatch {args.ubatch}, "
                                         f"{args.mode}: {seconds:.3f} s, {args.tokens / seconds:.0f} tok/s, "
                                         f"path {res.path}".encode())
            print(f"prefill {i + 1}: {seconds:.3f} s, {args.tokens / seconds:.0f} tok/s, path {res.path}, "
                  f"{res.n_ubatches} ubatches", flush=True)
            tl = res.timeline
            if tl is not None and len(tl):
                busy = tl.busy_seconds()
                print("  busy " + ", ".join(f"{k} {v / tl.wall:.0%}" for k, v in busy.items()), flush=True)
        _native.drain_log()

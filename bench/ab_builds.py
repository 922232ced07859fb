"""A/B two builds of pyturbo on the same box: stock and pipelined prefill throughput, runs interleaved (A, B, A, B, ...).

    python bench/ab_builds.py --python-a OLD_VENV/bin/python --python-b NEW_VENV/bin/python [--repeat 3]

Each run is a fresh process of the given interpreter (two builds cannot share one process: their libraries have the
same names), with its own local RPC workers; it prints one JSON line. Used to show that a refactor left speed alone.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

ONE_RUN = r"""
import json, sys, numpy as np, pyturbo
from pyturbo import synth, workers
preset, n, n_workers, ub_pipe = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
path = synth.cached_model(preset)
toks = np.random.default_rng(n).integers(0, 32000, n).astype(np.int32)
out = {}
with workers.local(n_workers, threads=1) as pool:
    with pyturbo.Model(path, rpc_servers=pool.endpoints, tensor_split="even") as model:
        for name, ub, pipe in (("stock", 512, False), ("pipelined", ub_pipe, True)):
            with model.context(n_ctx=n + 64, n_batch=2048, n_ubatch=ub, n_threads=1) as ctx:
                ctx.prefill(toks[:64], pipeline=pipe)  # warm-up
                ctx.reset()
                res = ctx.prefill(toks, pipeline=pipe)
                out[name] = n / res.seconds
                out[name + "_path"] = res.path
print(json.dumps(out))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--python-a", required=True)
    ap.add_argument("--python-b", required=True)
    ap.add_argument("--preset", default="bench-8l")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--ubatch", type=int, default=128, help="pipelined n_ubatch (stock: 512)")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    runs = {"a": [], "b": []}
    for i in range(args.repeat):
        for key in ("a", "b"):
            py = getattr(args, f"python_{key}")
            # pipeline=True is "pipeline where possible" on older builds and "auto" on newer ones; the environment
            # makes newer builds force it, so that both run the same path
            env = dict(os.environ, PYTURBO_PIPELINE="force", PYTURBO_CALIBRATION="off")
            proc = subprocess.run([py, "-c", ONE_RUN, args.preset, str(args.tokens), str(args.workers), str(args.ubatch)],
                                  capture_output=True, text=True, timeout=1800, cwd="/tmp", env=env)
            if proc.returncode != 0:
                print(proc.stderr[-2000:], file=sys.stderr)
                return 1
            runs[key].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(key, i, runs[key][-1], flush=True)
    for mode in ("stock", "pipelined"):
        a = [r[mode] for r in runs["a"]]
        b = [r[mode] for r in runs["b"]]
        print(f"{mode}: A median {statistics.median(a):.0f} ({min(a):.0f}-{max(a):.0f}) tok/s, "
              f"B median {statistics.median(b):.0f} ({min(b):.0f}-{max(b):.0f}) tok/s, "
              f"B/A {statistics.median(b) / statistics.median(a):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

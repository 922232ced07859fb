"""GPT-OSS-shaped MoE on one GPU: stock llama.cpp on the GPU as one device vs pyturbo's default (the GPU as stream
devices, auto's choice of path), and the forced pipeline (issue 24, item 3).

    python3 bench/gpu/gpt_oss_one_gpu.py --preset gpt-oss-20b --lengths 2048,8192,16384,32768

The stream layout is chosen when the library loads (PYTURBO_GPU_STREAMS), so each layout runs in a process of its
own; the two processes alternate --rounds times (interleaved), each timing --repeat prefills per length after one
untimed one, and the table shows medians over all rounds with min-max. In the default's process auto first calibrates
on the prompt (Context.calibrate), as a user's first prefills would, and is then timed as it decides. The logits of
both layouts are compared (max abs difference of the last token's; 0 = bit-identical).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

CHILD = "--child"


def child(args) -> None:
    import pyturbo
    from pyturbo import synth
    path = synth.cached_model(args.preset)
    with pyturbo.Model(path) as model:
        n_max = max(args.lengths)
        with model.context(n_ctx=n_max + 64, n_batch=min(n_max, 8192), n_ubatch=args.ubatch, flash_attn=True) as ctx:
            modes = ["off"] if args.layout == "1" else ["auto", "force"]
            for n in args.lengths:
                tokens = np.random.default_rng(n).integers(0, model.n_vocab, n).astype(np.int32)
                if "auto" in modes:
                    ctx.reset()
                    ctx.calibrate(tokens)
                for mode in modes:
                    ctx.reset()
                    ctx.prefill(tokens, pipeline=mode)          # untimed: buffers and graphs
                    for _ in range(args.repeat):
                        ctx.reset()
                        t0 = time.perf_counter()
                        res = ctx.prefill(tokens, pipeline=mode)
                        seconds = time.perf_counter() - t0
                        print(json.dumps({"layout": args.layout, "mode": mode, "n": n, "tps": n / seconds,
                                          "path": res.path, "devices": model.devices,
                                          "logits": ctx.logits()[:4096].tolist() if mode != "force" else None}),
                              flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="gpt-oss-20b")
    ap.add_argument("--lengths", default="2048,8192,16384")
    ap.add_argument("--ubatch", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--layout", default="auto", help=argparse.SUPPRESS)
    ap.add_argument(CHILD, action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.lengths = [int(x) for x in str(args.lengths).split(",")]
    if args.child:
        child(args)
        return 0

    from pyturbo import synth
    from pyturbo.tools.bench.report import median_spread
    t0 = time.time()
    synth.cached_model(args.preset, progress=True)      # written once, outside the timed processes
    print(f"model ready in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    runs = []
    for r in range(args.rounds):
        for layout in (["1", "auto"] if r % 2 == 0 else ["auto", "1"]):
            cmd = [sys.executable, __file__, CHILD, "--layout", layout, "--preset", args.preset,
                   "--lengths", ",".join(map(str, args.lengths)), "--ubatch", str(args.ubatch),
                   "--repeat", str(args.repeat)]
            out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTURBO_GPU_STREAMS=layout))
            if out.returncode != 0:
                print(out.stderr[-3000:], file=sys.stderr)
                return 1
            runs += [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    devices = {r["layout"]: r["devices"] for r in runs}
    print(f"# {args.preset}, ubatch {args.ubatch}, flash attention on; medians of {args.rounds} x {args.repeat} "
          f"(min-max). stock: {devices.get('1')} (PYTURBO_GPU_STREAMS=1, pipeline off); default: {devices.get('auto')} "
          "(pipeline auto); forced: the same layout, pipeline force\n")
    print("| prompt tokens | stock, one device | default | forced | default vs stock | default took | logits max diff |")
    print("|---|---|---|---|---|---|---|")
    for n in args.lengths:
        def cell(layout, mode):
            v = [r["tps"] for r in runs if r["n"] == n and r["layout"] == layout and r["mode"] == mode]
            return v
        stock, default, forced = cell("1", "off"), cell("auto", "auto"), cell("auto", "force")
        paths = sorted({r["path"] for r in runs if r["n"] == n and r["layout"] == "auto" and r["mode"] == "auto"})
        a = np.array([r["logits"] for r in runs if r["n"] == n and r["layout"] == "1"][0])
        b = np.array([r["logits"] for r in runs if r["n"] == n and r["layout"] == "auto" and r["mode"] == "auto"][0])
        print(f"| {n} | {median_spread(stock)} | {median_spread(default)} | {median_spread(forced)} | "
              f"{statistics.median(default) / statistics.median(stock):.2f}x | {'/'.join(paths)} | "
              f"{float(np.max(np.abs(a - b))):.3g} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

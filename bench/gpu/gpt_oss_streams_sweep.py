"""GPT-OSS-shaped MoE on one GPU: the forced pipeline over 2, 4, 6 and 8 stream devices against stock llama.cpp on the
GPU as one device, at ubatch 512 and 1024 (issue 24: where the time goes, and whether another layout reaches 1.4x).

    python3 bench/gpu/gpt_oss_streams_sweep.py --preset gpt-oss-20b --tokens 8192 --streams 1,2,4,6,8 \\
        --ubatch 512,1024 --repeat 3 --rounds 2 --out sweep.md

The stream layout is chosen when the library loads (PYTURBO_GPU_STREAMS), so each stream count runs in a process of
its own: 1 is stock (pipeline off), the others the forced pipeline. The processes run in turn, in reversed order
every other round (interleaved); each times --repeat prefills per ubatch after an untimed one, and the table shows
medians over all rounds (min-max), and "took" the path each setting ran (the forced pipeline falls back to the
standard path where it cannot run, with the reason). The last token's logits of every forced setting are compared with stock's at the
same ubatch (max abs difference; 0 = bit-identical).

Where the time goes (from the forced pipeline's timeline, CUDA-event clocks, the last run of each process): each
stage's mean time per ubatch; "stage sum" = the sum of those, the GPU time one ubatch's layers took while sharing the
GPU with the other stages; "overlap" = the stages' busy time / wall (how many stages ran at once, on average); stock's
time per ubatch is its wall / ubatches. Then forced speed / stock speed = (stock per ubatch / stage sum) x overlap
(less the pipeline's fill and drain): the first factor is what sharing the GPU costs each stage, the second what
running stages at once gains.

No process starts after --deadline (unix seconds; 0: none); what was measured is reported.
"""
from __future__ import annotations

import argparse
import hashlib
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
    n = args.tokens
    mode = "off" if args.layout == "1" else "force"
    tokens = np.random.default_rng(n).integers(0, 201088, n).astype(np.int32)
    t_load = time.perf_counter()
    with pyturbo.Model(path) as model:
        t_load = time.perf_counter() - t_load
        tokens %= model.n_vocab
        for ub in args.ubatch:
            with model.context(n_ctx=n + 64, n_batch=min(n, 8192), n_ubatch=ub, flash_attn=True) as ctx:
                ctx.reset()
                ctx.prefill(tokens, pipeline=mode)          # untimed: buffers and graphs
                for i in range(args.repeat):
                    ctx.reset()
                    t0 = time.perf_counter()
                    res = ctx.prefill(tokens, pipeline=mode)
                    seconds = time.perf_counter() - t0
                    logits = ctx.logits()
                    rec = {"layout": args.layout, "mode": mode, "ubatch": ub, "n": n, "tps": n / seconds,
                           "seconds": seconds, "path": res.path, "why": res.fallback_reason, "devices": model.devices, "load_s": t_load,
                           "sha": hashlib.sha256(logits.tobytes()).hexdigest(), "head": logits[:4096].tolist()}
                    tl = res.timeline
                    if i == args.repeat - 1 and tl is not None and len(tl):
                        a = tl.array
                        stage_ms = {name: float(np.sum((a["end"] - a["start"])[a["stage"] == s]) * 1e3 / tl.n_ubatches)
                                    for s, name in enumerate(tl.stages)}
                        busy = tl.busy_seconds()
                        rec["timeline"] = {"wall": tl.wall, "n_ubatches": tl.n_ubatches, "stage_ms": stage_ms,
                                           "busy": {k: v / tl.wall for k, v in busy.items()},
                                           "overlap": sum(busy.values()) / tl.wall, "clocks": tl.clocks(),
                                           "ascii": tl.ascii()}
                    print(json.dumps(rec), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="gpt-oss-20b")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--streams", default="1,2,4,6,8", help="PYTURBO_GPU_STREAMS per process; 1 = stock")
    ap.add_argument("--ubatch", default="512,1024")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--deadline", type=float, default=0.0)
    ap.add_argument("--out", default="")
    ap.add_argument("--layout", default="1", help=argparse.SUPPRESS)
    ap.add_argument(CHILD, action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.ubatch = [int(x) for x in str(args.ubatch).split(",")]
    if args.child:
        child(args)
        return 0

    from pyturbo import synth
    from pyturbo.tools.bench.report import median_spread
    t0 = time.time()
    synth.cached_model(args.preset, progress=True)
    print(f"model ready in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    layouts = args.streams.split(",")
    runs, skipped = [], []
    for r in range(args.rounds):
        for layout in (layouts if r % 2 == 0 else layouts[::-1]):
            if args.deadline and time.time() > args.deadline:
                skipped.append(f"round {r + 1} streams {layout}")
                continue
            cmd = [sys.executable, os.path.abspath(__file__), CHILD, "--layout", layout, "--preset", args.preset,
                   "--tokens", str(args.tokens), "--ubatch", ",".join(map(str, args.ubatch)),
                   "--repeat", str(args.repeat)]
            t1 = time.time()
            out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTURBO_GPU_STREAMS=layout))
            got = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
            print(f"round {r + 1}, streams {layout}: {time.time() - t1:.0f} s, rc {out.returncode}, "
                  + ", ".join(f"ub {g['ubatch']} {g['tps']:.0f}" for g in got), file=sys.stderr, flush=True)
            if out.returncode != 0:
                print(out.stderr[-3000:], file=sys.stderr, flush=True)
            runs += got

    lines = [f"# {args.preset}, {args.tokens} tokens, flash attention on, one GPU: stock (1 device, pipeline off) vs "
             f"the forced pipeline over N stream devices; medians of up to {args.rounds} x {args.repeat} (min-max), "
             "tok/s\n"]
    if skipped:
        lines.append(f"not run (deadline): {', '.join(skipped)}\n")
    lines.append("| ubatch | streams | tok/s | vs stock | took | logits max diff vs stock | stage ms per ubatch (mean "
                 "over stages) | stage sum ms | overlap | stock ms per ubatch |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    for ub in args.ubatch:
        stock = [r for r in runs if r["ubatch"] == ub and r["layout"] == "1"]
        stock_tps = statistics.median([r["tps"] for r in stock]) if stock else float("nan")
        stock_ms = (args.tokens / stock_tps) / -(-args.tokens // ub) * 1e3 if stock else float("nan")
        for layout in layouts:
            sel = [r for r in runs if r["ubatch"] == ub and r["layout"] == layout]
            if not sel:
                lines.append(f"| {ub} | {layout} | - | | | | | | | |")
                continue
            tps = [r["tps"] for r in sel]
            took = "/".join(sorted({r["path"] + (f" ({r['why']})" if r.get("why") else "") for r in sel}))
            diff = "-"
            if stock and layout != "1":
                a = np.array(stock[0]["head"])
                diff = max(float(np.max(np.abs(np.array(r["head"]) - a))) for r in sel)
                same = all(r["sha"] == stock[0]["sha"] for r in sel)
                diff = f"{diff:.3g}" + (" (all logits equal)" if same else " (full logits differ)")
            tls = [r["timeline"] for r in sel if "timeline" in r]
            if tls:
                stage = statistics.mean(statistics.mean(t["stage_ms"].values()) for t in tls)
                ssum = statistics.mean(sum(t["stage_ms"].values()) for t in tls)
                ov = statistics.mean(t["overlap"] for t in tls)
                tl_cells = f"{stage:.1f} | {ssum:.1f} | {ov:.2f}"
            else:
                tl_cells = "| |"
            lines.append(f"| {ub} | {layout} | {median_spread(tps)} | {statistics.median(tps) / stock_tps:.2f}x | "
                         f"{took} | {diff} | {tl_cells} | {stock_ms:.1f} |")
    lines.append("")
    for ub in args.ubatch:
        for layout in layouts:
            tls = [r["timeline"] for r in runs if r["ubatch"] == ub and r["layout"] == layout and "timeline" in r]
            if tls:
                t = tls[-1]
                lines.append(f"Forced, {layout} streams, ubatch {ub} ({t['n_ubatches']} ubatches, {t['wall']:.3f} s): "
                             + ", ".join(f"{k} {v:.1f} ms/ubatch busy {t['busy'][k]:.0%}" for k, v in t["stage_ms"].items())
                             + f"; clocks {sorted(set(t['clocks'].values()))}")
                lines.append("```\n" + t["ascii"] + "\n```")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
        with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
            json.dump([{k: v for k, v in r.items() if k != "head"} for r in runs], f)
    return 0


if __name__ == "__main__":
    sys.exit(main())

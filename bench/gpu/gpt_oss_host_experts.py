"""GPT-OSS-shaped MoE on one GPU with the experts in host memory (issue 24, item 4): stock llama.cpp on the GPU as one
device vs pyturbo's default (the GPU as stream devices, auto's choice of path) and the forced pipeline, the routed
experts in host memory in every mode (Model(experts_in_host_memory=True), llama.cpp's --cpu-moe / -ot exps=CPU).

    python3 bench/gpu/gpt_oss_host_experts.py --preset gpt-oss-20b --lengths 2048,8192,16384 --ubatch 2048 \\
        --out host-experts.md

The stream layout is chosen when the library loads (PYTURBO_GPU_STREAMS), so each layout runs in a process of its
own: "1" (one device: stock, pipeline off) and "auto" (pyturbo's stream devices: the default, pipeline auto after
Context.calibrate, then pipeline force). The two processes alternate --rounds times (interleaved), each timing
--repeat prefills per length and ubatch; cells show medians over all rounds with min-max. auto's measurements go to a
fresh file shared by this run's processes (so later rounds do not calibrate again). The last-token logits of every
mode are compared with stock's (max abs difference; 0 = bit-identical). Under the table: the forced pipeline's
timeline at the longest prompt (busy share per device; the CPU row is this process's CPU, where the experts' work
that is not offloaded runs).

Where the experts run: llama.cpp's scheduler offloads a matmul whose weights are in host memory to the first GPU
device when the ubatch has at least 32 tokens (the weights cross PCIe for every ubatch), so n_ubatch sets how often
they cross: larger ubatches amortize it.

Time: no mode of a length starts after --budget seconds (what it measured is reported, the rest is "-"). About
4-6 minutes for the defaults on an H200 host if stock makes ~3000 tok/s at ubatch 2048 (the weights cross PCIe once
per ubatch: ~10 GB for gpt-oss-20b); ubatch 512 is about 4x slower.
--cpu-smoke runs the same code on gpt-oss-tiny on this machine's CPU, with local RPC workers in place of the devices
(1 worker for stock, 3 for the stream layout), to check the script without a GPU.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

CHILD = "--child"
LAYOUTS = ("1", "auto")              # PYTURBO_GPU_STREAMS of the stock and the default process
SMOKE = {"preset": "gpt-oss-tiny", "lengths": "300,600", "ubatch": "32", "repeat": 1, "rounds": 2}
SMOKE_WORKERS = {"1": 1, "auto": 3}  # --cpu-smoke: RPC workers standing in for the layout's devices


def open_model(args, stack: contextlib.ExitStack):
    """The model of this layout, experts in host memory: the GPU's devices, or (--cpu-smoke) local RPC workers."""
    import pyturbo
    from pyturbo import synth, workers
    path = synth.cached_model(args.preset)
    if not args.cpu_smoke:
        return stack.enter_context(pyturbo.Model(path, host_tensors=args.host_tensors))
    pool = stack.enter_context(workers.local(SMOKE_WORKERS[args.layout], threads=1))
    split = "even" if len(pool.endpoints) > 1 else None
    return stack.enter_context(pyturbo.Model(path, rpc_servers=pool.endpoints, tensor_split=split,
                                             host_tensors=args.host_tensors))


def device_busy(timeline) -> dict[str, float]:
    """Share of the prefill's wall time each device was busy (overlapping records counted once)."""
    spans: dict[str, list[tuple[float, float]]] = {}
    for r in timeline:
        spans.setdefault(r.device, []).append((r.start, r.end))
    busy = {}
    for dev, items in spans.items():
        total, end = 0.0, float("-inf")
        for s, e in sorted(items):
            if e > end:
                total += e - max(s, end)
                end = e
        busy[dev] = total / timeline.wall if timeline.wall > 0 else float("nan")
    return busy


def timed(ctx, tokens, mode: str) -> tuple[float, object]:
    ctx.reset()
    t0 = time.perf_counter()
    res = ctx.prefill(tokens, pipeline=mode)
    return time.perf_counter() - t0, res


def emit(**record) -> None:
    print(json.dumps(record), flush=True)


def child(args) -> None:
    """One layout's process: every (ubatch, length) it has time for, each mode --repeat times."""
    with contextlib.ExitStack() as stack:
        model = open_model(args, stack)
        modes = ["off"] if args.layout == "1" else ["auto", "force"]
        n_max = max(args.lengths)
        for ub in args.ubatch:
            ctx_args = dict(n_ctx=n_max + 64, n_batch=max(ub, min(n_max, 8192)), n_ubatch=ub, flash_attn=True)
            if args.cpu_smoke:
                ctx_args["n_threads"] = 1
            with model.context(**ctx_args) as ctx:
                warm: set[str] = set()
                for n in args.lengths:
                    measure_length(ctx, model, args, modes, n, ub, warm)


def measure_length(ctx, model, args, modes: list[str], n: int, ub: int, warm: set[str]) -> None:
    """One prompt length: auto calibrates on it first (what a user's first prefills of this length would measure),
    each mode gets an untimed run in its context's first length (buffers and graphs), then --repeat timed runs;
    the forced pipeline's last run at the longest length brings its timeline. A mode not started before the
    deadline is reported as skipped."""
    tokens = np.random.default_rng(n).integers(0, model.n_vocab, n).astype(np.int32)
    for mode in modes:
        if time.time() > args.deadline:
            emit(layout=args.layout, mode=mode, n=n, ubatch=ub, skipped="time")
            continue
        if mode == "auto":
            ctx.reset()
            ctx.calibrate(tokens)
        if mode not in warm:
            timed(ctx, tokens, mode)
            warm.add(mode)
        for i in range(args.repeat):
            seconds, res = timed(ctx, tokens, mode)
            logits = ctx.logits()
            record = dict(layout=args.layout, mode=mode, n=n, ubatch=ub, tps=n / seconds, path=res.path,
                          decision=res.decision, why=res.fallback_reason, devices=model.devices,
                          logits_sha=hashlib.sha256(logits.tobytes()).hexdigest(), logits_head=logits[:4096].tolist())
            if (mode == "force" and n == max(args.lengths) and i == args.repeat - 1 and res.timeline is not None
                    and len(res.timeline)):
                record["timeline"] = {"ascii": res.timeline.ascii(), "busy": device_busy(res.timeline),
                                      "wall": res.timeline.wall, "n_ubatches": res.timeline.n_ubatches}
            emit(**record)


def run_rounds(args) -> list[dict]:
    """The layouts' processes, alternating, --rounds times (or until the budget is spent)."""
    runs = []
    env = dict(os.environ)
    env.setdefault("PYTURBO_CALIBRATION", os.path.join(tempfile.mkdtemp(prefix="pt-host-experts-"), "calib.json"))
    for r in range(args.rounds):
        if time.time() > args.deadline:
            print(f"round {r + 1}: not started, the budget of {args.budget:.0f} s is spent", file=sys.stderr)
            break
        for layout in (LAYOUTS if r % 2 == 0 else LAYOUTS[::-1]):
            cmd = [sys.executable, os.path.abspath(__file__), CHILD, "--layout", layout, "--preset", args.preset,
                   "--lengths", ",".join(map(str, args.lengths)), "--ubatch", ",".join(map(str, args.ubatch)),
                   "--repeat", str(args.repeat), "--deadline", str(args.deadline), "--host-tensors", args.host_tensors]
            cmd += ["--cpu-smoke"] if args.cpu_smoke else []
            t0 = time.time()
            out = subprocess.run(cmd, capture_output=True, text=True, env=dict(env, PYTURBO_GPU_STREAMS=layout))
            print(f"round {r + 1}, layout {layout}: {time.time() - t0:.0f} s, rc {out.returncode}", file=sys.stderr,
                  flush=True)
            if out.returncode != 0:
                print(out.stderr[-3000:], file=sys.stderr)
                raise SystemExit(1)
            runs += [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return runs


def max_diff(a: dict, b: dict) -> str:
    if a["logits_sha"] == b["logits_sha"]:
        return "0"
    return f"{float(np.max(np.abs(np.array(a['logits_head']) - np.array(b['logits_head'])))):.3g}"


def table(args, runs: list[dict]) -> list[str]:
    from pyturbo.tools.bench.report import median_spread
    lines = ["| prompt tokens | ubatch | stock, one device | default | forced | default vs stock | forced vs stock "
             "| default took | forced took | logits max diff vs stock: default / forced |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for ub in args.ubatch:
        for n in args.lengths:
            sel = {m: [r for r in runs if r["n"] == n and r["ubatch"] == ub and r.get("mode") == m]
                   for m in ("off", "auto", "force")}
            tps = {m: [r["tps"] for r in v] for m, v in sel.items()}
            cell = {m: median_spread(v) if v else "-" for m, v in tps.items()}
            ratio = {m: f"{statistics.median(tps[m]) / statistics.median(tps['off']):.2f}x"
                     if tps[m] and tps["off"] else "-" for m in ("auto", "force")}
            took = {m: "/".join(sorted({r["path"] for r in sel[m]})) or "-" for m in ("auto", "force")}
            diffs = [max_diff(sel["off"][0], sel[m][0]) if sel["off"] and sel[m] else "-" for m in ("auto", "force")]
            lines.append(f"| {n} | {ub} | {cell['off']} | {cell['auto']} | {cell['force']} | {ratio['auto']} | "
                         f"{ratio['force']} | {took['auto']} | {took['force']} | {diffs[0]} / {diffs[1]} |")
    return lines


def timelines(runs: list[dict]) -> list[str]:
    lines = []
    for r in runs:
        if "timeline" not in r:
            continue
        t = r["timeline"]
        busy = ", ".join(f"{dev} {share:.0%}" for dev, share in t["busy"].items())
        lines += ["", f"Forced pipeline, {r['n']} tokens, ubatch {r['ubatch']} ({t['n_ubatches']} ubatches, "
                  f"{t['wall']:.2f} s): busy {busy}", "", "```", t["ascii"], "```"]
    return lines


def report(args, records: list[dict]) -> str:
    runs = [r for r in records if "tps" in r]     # measured; the others say what the budget left out
    devices = {r["layout"]: r["devices"] for r in runs if "devices" in r}
    auto_why = sorted({f"{r['n']} tokens, ub {r['ubatch']} ({r['decision']}; {r['why']})" for r in runs
                       if r.get("mode") == "auto" and r["path"] != "pipelined"})
    forced_why = sorted({f"{r['n']} tokens, ub {r['ubatch']} ({r['why']})" for r in runs
                         if r.get("mode") == "force" and r["path"] != "pipelined"})
    skipped = sorted({(r["mode"], r["n"], r["ubatch"]) for r in records if r.get("skipped")})
    head = [f"# {args.preset}, experts in host memory (host_tensors {args.host_tensors!r}), flash attention on; "
            f"medians of up to {args.rounds} rounds x {args.repeat} (min-max), tok/s",
            "",
            f"stock: {devices.get('1')} (PYTURBO_GPU_STREAMS=1, pipeline off); default: {devices.get('auto')} "
            "(pipeline auto, calibrated first); forced: the same layout, pipeline force"
            + (" -- CPU smoke run: local RPC workers stand in for the devices" if args.cpu_smoke else ""), ""]
    tail = [""] + ([f"auto took the standard path at {', '.join(auto_why)}"] if auto_why else [])
    tail += [f"the forced pipeline fell back to the standard path at {', '.join(forced_why)}"] if forced_why else []
    left_out = ", ".join(f"{m} {n} tokens ub {u}" for m, n, u in skipped)
    tail += [f"not measured in some round (time budget): {left_out}"] if skipped else []
    return "\n".join(head + table(args, runs) + tail + timelines(runs)) + "\n"


def parse(argv=None) -> argparse.Namespace:
    from pyturbo.model import EXPERT_TENSORS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="gpt-oss-20b", help="gpt-oss-20b (default; 14 GB, written once) or "
                    "gpt-oss-120b (65 GB)")
    ap.add_argument("--lengths", default="2048,8192,16384", help="prompt lengths (add 32768 if there is time)")
    ap.add_argument("--ubatch", default="2048", help="n_ubatch values, comma-separated (each a row per length)")
    ap.add_argument("--repeat", type=int, default=2, help="timed prefills per mode, length and process")
    ap.add_argument("--rounds", type=int, default=2, help="alternations of the two layouts' processes")
    ap.add_argument("--budget", type=float, default=360, help="seconds after which no mode of a length is started "
                    "(one that runs then finishes)")
    ap.add_argument("--host-tensors", default=EXPERT_TENSORS, help="the weights kept in host memory")
    ap.add_argument("--out", help="write the markdown here too")
    ap.add_argument("--cpu-smoke", action="store_true", help="gpt-oss-tiny on the CPU, RPC workers as devices "
                    f"(sets {SMOKE} unless given)")
    ap.add_argument("--layout", default="auto", help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, default=0, help=argparse.SUPPRESS)
    ap.add_argument(CHILD, action="store_true", help=argparse.SUPPRESS)
    given = {a.split("=")[0][2:] for a in (sys.argv[1:] if argv is None else argv) if a.startswith("--")}
    args = ap.parse_args(argv)
    if args.cpu_smoke and not args.child:
        for k, v in SMOKE.items():
            if k not in given:
                setattr(args, k, v)
    args.lengths = [int(x) for x in str(args.lengths).split(",")]
    args.ubatch = [int(x) for x in str(args.ubatch).split(",")]
    args.deadline = args.deadline or time.time() + args.budget
    return args


def main(argv=None) -> int:
    args = parse(argv)
    if args.child:
        child(args)
        return 0
    from pyturbo import synth
    t0 = time.time()
    synth.cached_model(args.preset, progress=not args.cpu_smoke)   # written once, outside the timed processes
    print(f"model ready in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    args.deadline = time.time() + args.budget
    text = report(args, run_rounds(args))
    sys.stdout.write(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

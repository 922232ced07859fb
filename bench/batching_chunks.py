"""The chunk size of pyturbo.batching: a long prompt's time to first token against the worst gap of streams that
generate meanwhile, for several --max-gap-ms bounds, in-process (no HTTP), and the aggregate decode speed of users
decoding at once.

    python bench/batching_chunks.py                   # the server bench's layout: ~15 min on 2 cores
    python bench/batching_chunks.py --quick           # one round, short prompts

Layout: the server bench model (bench/server_reference.py's: 8 layers, 1024 wide, F16, the tiny real vocabulary),
--workers local RPC workers x 1 thread, one BatchedGenerator of --parallel sequences (n_batch 8192, --n-ubatch), the
prefill paths calibrated first (in memory), every measurement from an empty KV cache. Per round and bound (bounds in turn, the order alternating between
rounds): --streams streams generate (greedy, EOS ignored), each past 8 tokens, then a prompt of each --lengths
arrives (pipeline forced, so the path is the same in every row): its TTFT (submit to first token), the streams' worst
gap between two tokens that overlaps its prefill, the chunks it took; "unchunked" is the same with no bound. Then
"alone": the prompt with nobody generating. Medians (min-max) over rounds.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("PYTURBO_CALIBRATION", "off")   # measure afresh, in memory

import numpy as np  # noqa: E402

import pyturbo  # noqa: E402
from pyturbo.batching import BatchedGenerator  # noqa: E402
from pyturbo.tools import synth, workers  # noqa: E402

UNCHUNKED = 1e9   # a bound no chunk reaches: every prompt in one go


def bench_model() -> Path:
    shape = dataclasses.replace(synth.PRESETS["bench-8l"], n_vocab=synth.tiny_vocab_size())
    return synth.cached_model(shape, vocab="tiny", chat_template=synth.TINY_CHAT_TEMPLATE, progress=True)


def under_load(gen, rng, n_vocab: int, length: int, n_streams: int) -> dict:
    """n_streams streams generating, then a prompt of `length` tokens: its TTFT and the streams' gaps meanwhile."""
    gen.forget_prompt_caches()   # every row starts from an empty cache
    arrivals = [[] for _ in range(n_streams)]
    streams = [gen.submit(rng.integers(0, n_vocab, 16).tolist(), max_tokens=4000, temperature=0, ignore_eos=True,
                          listener=lambda item, i=i: arrivals[i].append(time.perf_counter()))
               for i in range(n_streams)]
    while min(map(len, arrivals)) < 8:
        time.sleep(0.01)
    t_sent = time.perf_counter()
    long = gen.submit(rng.integers(0, n_vocab, length).tolist(), max_tokens=1, temperature=0, pipeline="force",
                      cache_prompt=False)
    done = long.result()
    t_first = long.t_first
    while min(times[-1] for times in arrivals) <= t_first:   # the gap running at its first token ends after it
        time.sleep(0.005)
    for s in streams:
        s.cancel()
    for s in streams:
        s.result()
    gaps = [b - a for times in arrivals for a, b in zip(times, times[1:]) if b > t_sent and a < t_first]
    before = [b - a for times in arrivals for a, b in zip(times, times[1:]) if b <= t_sent]
    return {"ttft": t_first - t_sent, "gap": max(gaps), "gap_before": statistics.median(before),
            "chunks": [c.n_tokens for c in long.prefill_chunks], "prefill_s": done.prefill.seconds}


def alone(gen, rng, n_vocab: int, length: int) -> dict:
    gen.forget_prompt_caches()
    run = gen.submit(rng.integers(0, n_vocab, length).tolist(), max_tokens=1, temperature=0, pipeline="force",
                     cache_prompt=False)
    done = run.result()
    return {"ttft": run.t_first - run.t_submit, "prefill_s": done.prefill.seconds}


def decoding(gen, rng, n_vocab: int, users: int, max_tokens: int) -> float:
    """users decoding at once: all tokens but the first / (last token of any - first token of any)."""
    gen.forget_prompt_caches()
    arrivals: list[float] = []
    runs = [gen.submit(rng.integers(0, n_vocab, 16).tolist(), max_tokens=max_tokens, temperature=0, ignore_eos=True,
                       listener=lambda item: arrivals.append(time.perf_counter())) for _ in range(users)]
    for r in runs:
        r.result()
    tokens = sorted(arrivals)[:users * max_tokens]   # the completions' own events are not tokens
    return (len(tokens) - 1) / (tokens[-1] - tokens[0])


def spread(values: list[float], fmt: str = "{:.2f}") -> str:
    med = fmt.format(statistics.median(values))
    return med if len(values) == 1 else f"{med} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python bench/batching_chunks.py", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--bounds", default="250,500,1000,2000", help="--max-gap-ms values, ms")
    ap.add_argument("--lengths", default=None, help="long prompt lengths (default 1500,6000; quick 1500)")
    ap.add_argument("--repeat", type=int, default=None, help="rounds (default 3; quick 1)")
    ap.add_argument("--n-ubatch", type=int, default=512)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--streams", type=int, default=3)
    ap.add_argument("--users", type=int, default=4, help="users of the decode row")
    ap.add_argument("--out", type=Path, help="also write the table here")
    args = ap.parse_args(argv)
    lengths = [int(x) for x in (args.lengths or ("1500" if args.quick else "1500,6000")).split(",")]
    repeat = args.repeat or (1 if args.quick else 3)
    bounds = [float(x) for x in args.bounds.split(",")] + [UNCHUNKED]
    path = bench_model()
    rows: dict = {}
    with workers.local(args.workers, threads=1) as pool, \
            pyturbo.Model(path, rpc_servers=pool.endpoints, tensor_split="even") as model:
        n_vocab = model.n_vocab
        for rnd in range(repeat):
            rng = np.random.default_rng(rnd)
            for bound in (bounds if rnd % 2 == 0 else bounds[::-1]):
                with BatchedGenerator.open(model, n_seq=args.parallel, n_ctx=8192, n_batch=8192,
                                           n_ubatch=args.n_ubatch, n_threads=1, max_gap_ms=bound) as gen:
                    gen.calibrate([1024, 2048, 4096], 300)
                    if bound == UNCHUNKED:
                        rows.setdefault("decode", []).append(decoding(gen, rng, n_vocab, args.users, 128))
                        print(f"round {rnd + 1}: {args.users} users decoding: {rows['decode'][-1]:.1f} tok/s",
                              file=sys.stderr, flush=True)
                    for n in lengths:
                        r = under_load(gen, rng, n_vocab, n, args.streams)
                        rows.setdefault((bound, n), []).append(r)
                        print(f"round {rnd + 1} bound {bound:g} ms, {n} tokens: TTFT {r['ttft']:.2f} s, worst gap "
                              f"{r['gap']:.2f} s, chunks {r['chunks']}", file=sys.stderr, flush=True)
                        if bound == UNCHUNKED:
                            rows.setdefault(("alone", n), []).append(alone(gen, rng, n_vocab, n))
    text = report(rows, bounds, lengths, args)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


def report(rows: dict, bounds: list[float], lengths: list[int], args) -> str:
    out = [f"| prompt tokens | --max-gap-ms | TTFT s while {args.streams} stream | worst gap s | streams' median gap "
           f"before s | chunks (first round) | TTFT / alone |", "|---|---|---|---|---|---|---|"]
    for n in lengths:
        base = statistics.median(r["ttft"] for r in rows[("alone", n)])
        for bound in bounds:
            rs = rows[(bound, n)]
            label = "unchunked" if bound == UNCHUNKED else f"{bound:g}"
            out.append(f"| {n} | {label} | {spread([r['ttft'] for r in rs])} | {spread([r['gap'] for r in rs])} | "
                       f"{spread([r['gap_before'] for r in rs], '{:.3f}')} | {rs[0]['chunks']} | "
                       f"{statistics.median(r['ttft'] for r in rs) / base:.2f} |")
        out.append(f"| {n} | alone (nobody generating) | {spread([r['ttft'] for r in rows[('alone', n)]])} | | | | "
                   f"1.00 |")
    out += ["", f"{args.users} users decoding at once (128 tokens each), aggregate: "
                f"{spread(rows['decode'], '{:.1f}')} tok/s"]
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())

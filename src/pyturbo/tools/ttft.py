"""`python -m pyturbo.tools.ttft`: time to first token through the HTTP API for long prompts, with the server's
pipeline forced and off in one run, and the server's overhead over an in-process prefill of the same prompt.

Without --url it sets everything up: a synthetic model (token-id prompts, no download), --workers local RPC workers
for a server it starts on 127.0.0.1, and as many again for the in-process reference, so that both run on equal
devices. Repeats are interleaved (every length and mode once per round) so that a noisy machine spreads its noise
over all of them. With --url it measures that server only (its model must accept the token ids it sends).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

MODES = ("force", "off")   # the server's pipeline modes compared (the library's names)


def http_ttft(client, url: str, key: str | None, tokens: list[int], pipeline: str) -> dict:
    """One streamed completion of a single token: seconds to the first event, and the server's own timings."""
    body = {"prompt": tokens, "max_tokens": 1, "temperature": 0, "stream": True, "cache_prompt": False,
            "pipeline": pipeline}
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    t0 = time.perf_counter()
    ttft, timings = None, {}
    with client.stream("POST", url + "/v1/completions", json=body, headers=headers) as r:
        if r.status_code != 200:
            raise RuntimeError(f"the server answered {r.status_code}: {r.read().decode(errors='replace')[:500]}")
        for line in r.iter_lines():
            if not line.startswith("data:"):
                continue
            if ttft is None:
                ttft = time.perf_counter() - t0
            data = line[5:].strip()
            if data != "[DONE]":
                timings = json.loads(data).get("timings", timings)
    return {"ttft": ttft, "prefill": timings.get("prompt_ms", float("nan")) / 1e3,
            "path": timings.get("prefill_path", "?"), "reason": timings.get("fallback_reason", "")}


def inprocess_ttft(ctx, tokens: list[int]) -> dict:
    """The same work in this process: a pipelined prefill of the prompt, then its first (greedy) token."""
    ctx.reset()
    t0 = time.perf_counter()
    res = ctx.prefill(tokens, pipeline="force")
    int(np.argmax(res.logits))
    return {"ttft": time.perf_counter() - t0, "prefill": res.seconds, "path": res.path, "reason": res.fallback_reason}


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f}–{max(values):.3f})"


def report(rows: dict, lengths: list[int], overhead_len: int, inproc: list[dict]) -> str:
    out = ["| prompt tokens | pipeline | TTFT s, median (min–max) | server prefill s | prefill tok/s | "
           "TTFT − prefill ms | path |", "|---|---|---|---|---|---|---|"]
    for n in lengths:
        for mode in MODES:
            rs = rows[(n, mode)]
            prefill = statistics.median(r["prefill"] for r in rs)
            rest = statistics.median(1e3 * (r["ttft"] - r["prefill"]) for r in rs)
            paths = sorted({r["path"] + (f" ({r['reason']})" if r["reason"] else "") for r in rs})
            out.append(f"| {n} | {mode} | {spread([r['ttft'] for r in rs])} | {prefill:.3f} | {n / prefill:.0f} | "
                       f"{rest:.1f} | {', '.join(paths)} |")
        forced, off = rows[(n, "force")], rows[(n, "off")]
        ratio = statistics.median(o["ttft"] / p["ttft"] for o, p in zip(off, forced))
        out.append(f"| {n} | off/force | {ratio:.2f}x (median of the rounds' ratios) | | | | |")
    if inproc:
        http = [r["ttft"] for r in rows[(overhead_len, "force")]]
        local = [r["ttft"] for r in inproc]
        pairs = [h / i - 1 for h, i in zip(http, local)]
        out += ["", f"Server overhead at {overhead_len} tokens (HTTP TTFT with the pipeline forced vs the in-process "
                    f"pipelined prefill + first token, paired by round): in-process {spread(local)} s, HTTP "
                    f"{spread(http)} s, overhead median {100 * statistics.median(pairs):+.1f}% "
                    f"(rounds: {', '.join(f'{100 * p:+.1f}%' for p in pairs)})"]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pyturbo.tools.ttft", description=__doc__.splitlines()[0])
    ap.add_argument("--url", help="measure this running server (default: start one on local RPC workers)")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--lengths", default="2048,4096,8192,16384,32768", help="prompt lengths in tokens")
    ap.add_argument("--repeat", type=int, default=3, help="rounds (each measures every length and mode once)")
    ap.add_argument("--preset", default="ttft", help="synthetic model: 'ttft' (6 layers, 256 wide) or a "
                                                     "pyturbo.synth preset")
    ap.add_argument("--workers", type=int, default=3, help="local RPC workers of the server (and of the reference)")
    ap.add_argument("--threads", type=int, default=1, help="threads per worker and of the server")
    ap.add_argument("--ubatch", type=int, default=256, help="n_ubatch of the server and the reference")
    ap.add_argument("--batch", type=int, default=8192, help="n_batch of the server and the reference")
    ap.add_argument("--overhead-length", type=int, default=8192, help="prompt length of the overhead check")
    ap.add_argument("--out", type=Path, help="also write the table (markdown) here")
    args = ap.parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",")]
    if args.repeat < 1 or args.workers < 2:
        ap.error("--repeat must be >= 1 and --workers >= 2")
    import httpx

    from .ttft_setup import local_setup
    with local_setup(args, max(lengths)) if not args.url else _remote(args.url, args.api_key) as (url, ctx, n_vocab):
        rows = {(n, m): [] for n in lengths for m in MODES}
        inproc = []
        with httpx.Client(timeout=httpx.Timeout(600.0, connect=10.0)) as client:
            http_ttft(client, url, args.api_key, list(range(1, 300)), "force")  # warm-up: first-request costs
            for rnd in range(args.repeat):
                for n in lengths:
                    tokens = np.random.default_rng(rnd * 1000 + n).integers(0, n_vocab, n).tolist()
                    order = MODES if rnd % 2 == 0 else MODES[::-1]  # alternate which mode goes first
                    for mode in order:
                        rows[(n, mode)].append(http_ttft(client, url, args.api_key, tokens, mode))
                        print(f"round {rnd + 1} {n} tokens pipeline {mode}: TTFT {rows[(n, mode)][-1]['ttft']:.3f} s",
                              file=sys.stderr, flush=True)
                    if ctx is not None and n == args.overhead_length:
                        inproc.append(inprocess_ttft(ctx, tokens))
                        print(f"round {rnd + 1} {n} tokens in-process: {inproc[-1]['ttft']:.3f} s", file=sys.stderr,
                              flush=True)
    text = report(rows, lengths, args.overhead_length, inproc)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


class _remote:
    """--url: no setup; the vocabulary size comes from /v1/models."""

    def __init__(self, url: str, key: str | None):
        self.url, self.key = url.rstrip("/"), key

    def __enter__(self):
        import httpx
        headers = {"Authorization": f"Bearer {self.key}"} if self.key else {}
        meta = httpx.get(self.url + "/v1/models", headers=headers, timeout=30).json()["data"][0].get("meta", {})
        return self.url, None, int(meta.get("n_vocab", 256))

    def __exit__(self, *exc):
        return False


if __name__ == "__main__":
    sys.exit(main())

"""Prefill over RPC workers behind shaped links: stock, the pipeline relaying activations through the coordinator, the
pipeline with server-to-server copies, and those with the compact F16 wire (issue 22's table).

    sudo python bench/shaped_links.py                       # the full table (~15 min on 2 cores)
    sudo python bench/shaped_links.py --rates 50 --models per-worker --repeat 1     # one row, quickly

Every topology is built by pyturbo.tools.links (network namespaces, veth, htb; root only): "coordinator" puts one
link of the rate at the coordinator, shared by all workers; "per-worker" gives each worker its own link (both ways),
so a worker-to-worker copy crosses two. The unshaped rows use the same topology with no shaping, measured first and
last; each shaped row is compared with the same mode unshaped (median of the two). Within a topology the modes run
interleaved, `--repeat` times, and the table shows medians with min-max. Bytes through the coordinator are counted on
its interface (headers included) and given per ubatch in units of A = n_ubatch x n_embd x 4 bytes (one ubatch's
activations). transfer/stage: the time to send A over one link at the rate, over one stage's time per ubatch
(n_ubatch / the unshaped direct pipeline's tok/s): below 1 a transfer can hide behind a stage's computation.
Every mode's logits are compared with stock's: bit-identical, except the compact wire (within RPC_WIRE_TOLERANCE).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

import pyturbo
from pyturbo import synth
from pyturbo.results import RPC_WIRE_TOLERANCE, within_tolerance
from pyturbo.model import INPUT_LAYERS
from pyturbo.tools import links
from pyturbo.tools.bench.report import median_spread

# (label, pipeline, rpc_transfers, rpc_wire)
MODES = [("stock", "off", "direct", None), ("relay", "force", "relay", None),
         ("direct", "force", "direct", None), ("direct+f16", "force", "direct", "f16")]


def measure_topology(args, rate, model_kind, tokens, reference: bool = False) -> dict:
    """{mode: {"tps": [...], "bytes": [...], "logits": array, "transfers": str}} for one topology; with `reference`,
    also "_exact": the standard path's logits (untimed when stock is not among the modes)."""
    modes = [m for m in MODES if m[0] in args.modes]
    out = {label: {"tps": [], "bytes": [], "logits": None, "transfers": ""} for label, *_ in modes}
    with links.Links(args.workers, rate=rate, model=model_kind, threads=args.threads) as net, \
            pyturbo.Model(args.model, rpc_servers=net.endpoints, tensor_split="even",
                          input_layer=args.input_layer) as model:
        contexts = {label: model.context(n_ctx=len(tokens) + 64, n_batch=args.n_batch, n_ubatch=args.n_ubatch,
                                         n_threads=1, rpc_transfers=transfers, rpc_wire=wire)
                    for label, _, transfers, wire in modes}
        try:
            if reference and "stock" not in contexts:
                with model.context(n_ctx=len(tokens) + 64, n_batch=args.n_batch, n_ubatch=args.n_ubatch,
                                   n_threads=1) as ctx:
                    ctx.prefill(tokens, pipeline="off")
                    out["_exact"] = ctx.logits().copy()
            for label, pipeline, _, _ in modes:     # one untimed run each: buffers, graphs, the peer links
                contexts[label].prefill(tokens[:2 * args.n_ubatch], pipeline=pipeline)
                contexts[label].reset()
            for r in range(args.repeat):
                order = modes if r % 2 == 0 else modes[::-1]
                for label, pipeline, _, _ in order:
                    ctx = contexts[label]
                    before = net.coordinator_bytes()
                    t0 = time.perf_counter()
                    res = ctx.prefill(tokens, pipeline=pipeline)
                    seconds = time.perf_counter() - t0
                    after = net.coordinator_bytes()
                    out[label]["tps"].append(len(tokens) / seconds)
                    out[label]["bytes"].append((after.sent - before.sent + after.received - before.received)
                                               / res.n_ubatches)
                    out[label]["logits"] = ctx.logits().copy()
                    out[label]["transfers"] = res.transfers
                    ctx.reset()
                    print(f"  {model_kind:11} {rate or 'unshaped'!s:>8} {label:11} {len(tokens) / seconds:7.0f} tok/s",
                          file=sys.stderr, flush=True)
        finally:
            for ctx in contexts.values():
                ctx.close()
        out["_n_embd"], out["_n_vocab"], out["_input_layer"] = model.n_embd, model.n_vocab, model.input_layer
        out.setdefault("_exact", out.get("stock", {}).get("logits"))
    return out


def fill_bound(seconds: float, rate: float, kind: str, n_workers: int, input_layer: str, activation_bytes: int,
               logits_bytes: int) -> float:
    """The best "vs unshaped" a prefill of `seconds` unshaped can reach with direct copies, whatever the schedule: the
    first ubatch's activations cross one link per hop between workers (a copy crosses the sender's and the receiver's
    links packet by packet, so once in time) plus, with the embeddings on the CPU, the first worker's link; the last
    ubatch's logits cross the last worker's link. None of that latency overlaps anything. With one coordinator link,
    workers' copies do not cross it."""
    hops = (n_workers - 1 if kind == "per-worker" else 0) + (1 if input_layer == "cpu" else 0)
    latency = (hops * activation_bytes + logits_bytes) * 8 / (rate * 1e6)
    return seconds / (seconds + latency)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rates", default="200,100,50", help="Mbit/s, comma-separated")
    ap.add_argument("--models", default="coordinator,per-worker")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="threads per worker")
    ap.add_argument("--preset", default="bench-8l")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--n-batch", type=int, default=2048)
    ap.add_argument("--n-ubatch", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--input-layer", default="auto", choices=INPUT_LAYERS,
                    help="where the token embeddings live (Model(input_layer=)); every mode uses it")
    ap.add_argument("--modes", default=",".join(m[0] for m in MODES),
                    help="which of " + ", ".join(m[0] for m in MODES) + " to measure (comma-separated)")
    ap.add_argument("--json", type=Path, help="write the raw numbers here")
    args = ap.parse_args(argv)
    problem = links.unavailable_reason()
    if problem:
        ap.error(problem)
    args.model = synth.cached_model(args.preset)
    rates = [int(r) for r in args.rates.split(",")]
    kinds = args.models.split(",")
    tokens = np.random.default_rng(0).integers(0, 500, args.tokens).astype(np.int32)

    args.modes = args.modes.split(",")
    if not args.modes or not set(args.modes) <= {m[0] for m in MODES}:
        ap.error(f"--modes: a comma-separated subset of {[m[0] for m in MODES]}")
    unshaped = [measure_topology(args, None, kinds[0], tokens, reference=True)]
    shaped = {(k, r): measure_topology(args, r, k, tokens) for k in kinds for r in rates}
    unshaped.append(measure_topology(args, None, kinds[0], tokens))
    modes = [m for m in MODES if m[0] in args.modes]

    n_embd, n_vocab = unshaped[0]["_n_embd"], unshaped[0]["_n_vocab"]
    input_layer = unshaped[0]["_input_layer"]
    a_bytes = args.n_ubatch * n_embd * 4
    reference = {label: statistics.median(unshaped[0][label]["tps"] + unshaped[1][label]["tps"]) for label, *_ in modes}
    paced = "direct" if "direct" in reference else next(iter(reference))
    stage_s = args.n_ubatch / reference[paced]
    exact = unshaped[0]["_exact"]

    print(f"# {args.workers} workers x {args.threads} thread, {args.preset}, input layer on {input_layer} "
          f"(--input-layer {args.input_layer}), {args.tokens} tokens, n_batch "
          f"{args.n_batch}, n_ubatch {args.n_ubatch}; A = {a_bytes / 1024:.0f} KiB; medians of {args.repeat} "
          f"(min-max); ratio = vs the same mode unshaped; fill bound: the best ratio any schedule reaches, given the "
          f"link latency of the first ubatch's activations and the last one's logits (direct modes)\n")
    print("| link | rate (Mbit/s) | transfer/stage | mode | tok/s | vs unshaped | fill bound | "
          "coordinator bytes/ubatch (A) | outputs | transfers |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows = [("unshaped", None, unshaped[0])] + [(k, r, shaped[(k, r)]) for k in kinds for r in rates]
    for kind, rate, res in rows:
        ratio_ts = "" if rate is None else f"{a_bytes * 8 / (rate * 1e6) / stage_s:.2f}"
        for label, _, transfers, wire in modes:
            m = res[label]
            if wire:
                same = "within tol." if within_tolerance(m["logits"], exact, RPC_WIRE_TOLERANCE) else "OUT OF TOL."
            else:
                same = "bit-equal" if np.array_equal(m["logits"], exact) else "DIFFER"
            vs = statistics.median(m["tps"]) / reference[label]
            bound = "-"
            if rate is not None and transfers == "direct" and label != "stock":
                wire_bytes = a_bytes // 2 if wire else a_bytes
                bound = f"{fill_bound(args.tokens / reference[label], rate, kind, args.workers, input_layer, wire_bytes, n_vocab * 4):.2f}"
            print(f"| {kind} | {rate or '-'} | {ratio_ts} | {label} | {median_spread(m['tps'])} | {vs:.2f} | {bound} | "
                  f"{statistics.median(m['bytes']) / a_bytes:.2f} | {same} | {m['transfers'] or '-'} |")
    if args.json:
        raw = {f"{k}|{r}": {label: {"tps": res[label]["tps"], "bytes": res[label]["bytes"]} for label, *_ in modes}
               for k, r, res in rows + [("unshaped-end", None, unshaped[1])]}
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "A": a_bytes,
                                         "rows": raw}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Prefill over RPC workers behind shaped links: stock, the pipeline relaying activations through the coordinator, the
pipeline with server-to-server copies, and those with the compact F16 wire (issue 22's table).

    sudo python bench/shaped_links.py                       # the full table (~15 min on 2 cores)
    sudo python bench/shaped_links.py --rates 50 --models per-worker --repeat 1     # one row, quickly

Every topology is built by pyturbo.tools.links (network namespaces, veth, htb; root only): "coordinator" puts one
link of the rate at the coordinator, shared by all workers; "per-worker" gives each worker its own link (both ways),
so a worker-to-worker copy crosses two. Each link model is one topology, one set of workers and contexts; each
repeat runs it unshaped and at every rate (Links.set_rate reshapes the live links; unshaped first or last,
alternately), and every mode at each (alternating order), so shaped and unshaped runs interleave in the same
processes. Each shaped row is compared with the same mode on the same link model unshaped; the table shows medians
of `--repeat` runs with min-max. Bytes through the coordinator are counted on
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


def measure_link_model(args, model_kind, rates, tokens) -> dict:
    """{rate or None: {mode: {"tps": [...], "bytes": [...], "logits": array, "transfers": str}}} for one link model,
    plus "_exact" (the standard path's logits, unshaped) and a few facts of the model. One topology, one set of
    workers and contexts: each repeat runs every rate (unshaped first or last, alternately; Links.set_rate) and every
    mode (alternating order), so what drifts over time on a busy machine weighs on every cell alike."""
    modes = args.modes
    levels = [None, *rates]
    out = {rate: {label: {"tps": [], "bytes": [], "logits": None, "transfers": ""} for label, *_ in modes}
           for rate in levels}
    with links.Links(args.workers, rate=None, model=model_kind, threads=args.threads) as net, \
            pyturbo.Model(args.model, rpc_servers=net.endpoints, tensor_split="even",
                          input_layer=args.input_layer) as model:
        contexts = {label: model.context(n_ctx=len(tokens) + 64, n_batch=args.n_batch, n_ubatch=args.n_ubatch,
                                         n_threads=1, rpc_transfers=transfers, rpc_wire=wire)
                    for label, _, transfers, wire in modes}
        try:
            with model.context(n_ctx=len(tokens) + 64, n_batch=args.n_batch, n_ubatch=args.n_ubatch,
                               n_threads=1) as ctx:
                ctx.prefill(tokens, pipeline="off")
                out["_exact"] = ctx.logits().copy()
            for label, pipeline, _, _ in modes:     # one untimed run each: buffers, graphs, the peer links
                contexts[label].prefill(tokens[:2 * args.n_ubatch], pipeline=pipeline)
                contexts[label].reset()
            for r in range(args.repeat):
                for rate in (levels if r % 2 == 0 else levels[::-1]):
                    net.set_rate(rate)
                    for label, pipeline, _, _ in (modes if r % 2 == 0 else modes[::-1]):
                        cell = out[rate][label]
                        ctx = contexts[label]
                        before = net.coordinator_bytes()
                        t0 = time.perf_counter()
                        res = ctx.prefill(tokens, pipeline=pipeline)
                        seconds = time.perf_counter() - t0
                        after = net.coordinator_bytes()
                        cell["tps"].append(len(tokens) / seconds)
                        cell["bytes"].append((after.sent - before.sent + after.received - before.received)
                                             / res.n_ubatches)
                        cell["logits"] = ctx.logits().copy()
                        cell["transfers"] = res.transfers
                        ctx.reset()
                        print(f"  {model_kind:11} {rate or 'unshaped'!s:>8} {label:11} {len(tokens) / seconds:7.0f} "
                              "tok/s", file=sys.stderr, flush=True)
        finally:
            for ctx in contexts.values():
                ctx.close()
        out["_n_embd"], out["_n_vocab"], out["_input_layer"] = model.n_embd, model.n_vocab, model.input_layer
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

    names = args.modes.split(",")
    if not names or not set(names) <= {m[0] for m in MODES}:
        ap.error(f"--modes: a comma-separated subset of {[m[0] for m in MODES]}")
    args.modes = modes = [m for m in MODES if m[0] in names]      # (label, pipeline, rpc_transfers, rpc_wire)
    measured = {kind: measure_link_model(args, kind, rates, tokens) for kind in kinds}

    facts = measured[kinds[0]]
    n_embd, n_vocab, input_layer = facts["_n_embd"], facts["_n_vocab"], facts["_input_layer"]
    a_bytes = args.n_ubatch * n_embd * 4
    print(f"# {args.workers} workers x {args.threads} thread, {args.preset}, input layer on {input_layer} "
          f"(--input-layer {args.input_layer}), {args.tokens} tokens, n_batch "
          f"{args.n_batch}, n_ubatch {args.n_ubatch}; A = {a_bytes / 1024:.0f} KiB; medians of {args.repeat} "
          f"(min-max), rates interleaved in the same processes; vs unshaped: against the same mode on the same link "
          f"model unshaped; fill bound: the best ratio any schedule reaches, given the link latency of the first "
          f"ubatch's activations and the last one's logits (direct modes)\n")
    print("| link | rate (Mbit/s) | transfer/stage | mode | tok/s | vs unshaped | fill bound | "
          "coordinator bytes/ubatch (A) | outputs | transfers |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for kind in kinds:
        res = measured[kind]
        exact = res["_exact"]
        reference = {label: statistics.median(res[None][label]["tps"]) for label, *_ in modes}
        paced = "direct" if "direct" in reference else next(iter(reference))
        stage_s = args.n_ubatch / reference[paced]
        for rate in [None, *rates]:
            ratio_ts = "" if rate is None else f"{a_bytes * 8 / (rate * 1e6) / stage_s:.2f}"
            for label, _, transfers, wire in modes:
                m = res[rate][label]
                if wire:
                    same = "within tol." if within_tolerance(m["logits"], exact, RPC_WIRE_TOLERANCE) else "OUT OF TOL."
                else:
                    same = "bit-equal" if np.array_equal(m["logits"], exact) else "DIFFER"
                vs = statistics.median(m["tps"]) / reference[label]
                bound = "-"
                if rate is not None and transfers == "direct" and label != "stock":
                    wire_bytes = a_bytes // 2 if wire else a_bytes
                    bound = f"{fill_bound(args.tokens / reference[label], rate, kind, args.workers, input_layer, wire_bytes, n_vocab * 4):.2f}"
                print(f"| {kind if rate else f'{kind}, unshaped'} | {rate or '-'} | {ratio_ts} | {label} | "
                      f"{median_spread(m['tps'])} | {vs:.2f} | {bound} | {statistics.median(m['bytes']) / a_bytes:.2f} | "
                      f"{same} | {m['transfers'] or '-'} |")
    if args.json:
        raw = {f"{kind}|{rate}": {label: {"tps": measured[kind][rate][label]["tps"],
                                          "bytes": measured[kind][rate][label]["bytes"]} for label, *_ in modes}
               for kind in kinds for rate in [None, *rates]}
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "A": a_bytes,
                                         "rows": raw}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

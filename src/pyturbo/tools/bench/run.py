"""One benchmark run: workers and models up, every prompt length measured, the table printed, then the files."""
from __future__ import annotations

import datetime as dt
import json
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from .. import links, synth, workers
from ... import policy
from ...devices import usable_cpu_cores
from ...model import Model
from . import report
from .measure import CEILING_UBATCHES, PIPELINE_MODES, STOCK_BATCH, STOCK_UBATCH, make_rows, measure_length, one_device_series, plan


def run(args) -> int:
    """The run, with auto's calibration (and tensor_split="auto"'s balance) measured afresh in memory: a decision
    stored under other conditions (another load on this machine) is never reused, and this run stores nothing."""
    stored = policy.calibration().path
    where = f"{stored} is neither read nor written" if stored else "PYTURBO_CALIBRATION=off"
    print(f"calibration: measured in this run, in memory ({where})", file=sys.stderr)
    with policy.calibration_scope(policy.Calibration(None)):
        return _run(args)


def _run(args) -> int:
    from tqdm import tqdm

    model_path = args.model or synth.cached_model(args.preset, progress=True)
    print(f"layout: {args.layout}", file=sys.stderr)
    cores = usable_cpu_cores()
    args.ceiling_threads = cores
    if args.client_threads <= 0 and not args.devices:
        # with RPC workers the cores belong to them; this process only looks up token embeddings
        args.client_threads = 1
    plans = {n: plan(n, args.ubatches, sweep=not args.no_sweep, ceiling=args.reference == "ceiling", gpu=args.on_gpu,
                     first_ubatch=args.first_ubatch)
             for n in args.lengths}
    total = args.repeat * (sum(map(len, plans.values())) + (len(args.lengths) if args.reference == "1 device" else 0))
    load_before = report.load_average()
    if load_before and load_before[0] >= 1:
        print(f"note: load average {load_before[0]} before the run: other processes share the {cores} cores, so "
              "expect noise (the spreads show it)", file=sys.stderr)
    rows, schedule, timeline, pool, net, models = [], [], None, None, None, {"ceiling": None}
    try:
        with tqdm(total=total, desc="bench", unit="run", file=sys.stderr) as progress:
            one_device = {}
            if args.reference == "1 device":     # first, alone: the split model is not loaded yet
                print(f"measuring stock on {args.devices[0]} alone (the 1-device reference)", file=sys.stderr)
                with Model(model_path, devices=[args.devices[0]], host_tensors=args.host_tensors) as one:
                    one_device = one_device_series(one, args.lengths, args, progress)
            endpoints = args.endpoints
            if not endpoints and not args.devices and getattr(args, "link_rate", None) is not None:
                net = links.Links(args.workers, rate=args.link_rate or None, model=args.link_model,
                                  delay_ms=args.link_delay, threads=args.threads)
                endpoints, args.link_counter = net.endpoints, net.coordinator_bytes
            elif not endpoints and not args.devices:
                pool = workers.WorkerPool(args.workers, threads=args.threads)
                endpoints = pool.endpoints
            models["split"] = Model(model_path, rpc_servers=endpoints or None, devices=args.devices,
                                    tensor_split=args.split, host_tensors=args.host_tensors)
            print(f"layers per stage: {models['split'].layers_per_stage} ({models['split'].split_choice})",
                  file=sys.stderr)
            if args.reference == "ceiling":
                models["ceiling"] = Model(model_path, devices=["CPU"], host_tensors=args.host_tensors)
            for n in args.lengths:
                series = measure_length(models, n, plans[n], args, progress, schedule)
                length_rows = make_rows(n, series, args.ubatches, one_device.get(n), args.first_ubatch)
                rows += length_rows
                fastest = max(length_rows, key=lambda r: r.pipelined_tps)
                timeline = series[fastest.pipelined_run].median_result().timeline
            devices = models["split"].devices
            n_embd = models["split"].n_embd
            split_choice = {"layers_per_stage": models["split"].layers_per_stage,
                            "why": models["split"].split_choice}
    finally:
        for m in models.values():
            if m is not None:
                m.close()
        if pool is not None:
            pool.stop()
        if net is not None:
            net.close(raise_errors=False)    # what it cannot remove is a warning; the next harness removes it

    doc = make_doc(args, model_path, devices, rows, schedule, timeline, load_before)
    doc["layout"]["split"] = split_choice
    if net is not None:
        doc["links"] = net.describe() | {"n_embd": n_embd}
    if args.json:
        print(json.dumps(doc, indent=2, default=str))
    else:
        print(f"layout: {args.layout}")
        print(f"model: {model_path.name}; stages: {', '.join(devices)}; load average before/after: "
              f"{load_before} / {doc['machine']['load_after']} on {cores} cores")
        print(f"layers per stage: {split_choice['layers_per_stage']} ({split_choice['why']})")
        print(report.table(rows, doc["table"]["reference"]))
        print()
        print(report.legend(doc["table"]))
        if net is not None:
            print()
            print(report.link_table(rows, n_embd, net.shaping.describe()))
    for r in rows:
        if "standard" in r.path:
            print(f"note: at {r.prompt_tokens} tokens, ubatch {r.ubatch}, {PIPELINE_MODES[0][0]} ran the standard "
                  f"path: {r.fallback_reason}", file=sys.stderr)
    rc = save(args.out, doc, rows, timeline, sys.stderr if args.json else sys.stdout)
    bad = [(r.prompt_tokens, r.ubatch) for r in rows if not r.outputs_equal]
    if bad:
        how = "beyond the first_ubatch tolerance" if args.first_ubatch else ""
        print(f"ERROR: pipelined logits differ from the standard path {how} at (length, ubatch) {bad}".replace("  ", " "),
              file=sys.stderr)
        return 1
    return rc


def make_doc(args, model_path: Path, devices: list[str], rows, schedule, timeline, load_before) -> dict:
    machine = report.machine_info() | {"load_before": load_before, "load_after": report.load_average()}
    reference = args.reference or "ceiling"
    return {
        "date": dt.datetime.now().isoformat(timespec="seconds"), "commit": report.git_commit(),
        "command": " ".join(["python -m pyturbo.bench", *args.argv]),
        "layout": {"text": args.layout, "stages": devices, "workers": None if args.endpoints or args.devices
                   else args.workers, "threads_per_worker": args.threads},
        "machine": machine,
        "settings": {"model": str(model_path), "preset": None if args.model else args.preset,
                     "lengths": args.lengths, "ubatches": args.ubatches, "repeat": args.repeat,
                     "stock": {"n_batch": STOCK_BATCH, "n_ubatch": STOCK_UBATCH}, "sweep": not args.no_sweep,
                     "pipeline_modes": {name: value for name, value in PIPELINE_MODES},
                     "tensor_split": args.split, "host_tensors": args.host_tensors,
                     "flash_attn": str(args.flash_attn), "in_flight": args.in_flight, "first_ubatch": args.first_ubatch,
                     "client_threads": args.client_threads, "ceiling_threads": args.ceiling_threads},
        "table": {"repeat": args.repeat, "ubatches": args.ubatches, "sweep": not args.no_sweep, "gpu": args.on_gpu,
                  "reference": reference, "ceiling": args.reference is not None, "cores": usable_cpu_cores(),
                  "ceiling_threads": args.ceiling_threads,
                  "ceiling_ubs": list(CEILING_UBATCHES), "first_ubatch": args.first_ubatch},
        "results": [asdict(r) for r in rows],
        "schedule": schedule,
        "timeline": timeline.to_records() if timeline is not None else [],
    }


def save(out: Path, doc: dict, rows, timeline, stream) -> int:
    """Write the files; if `out` fails now (it was writable before the run), into a fresh temporary folder."""
    rc = 0
    try:
        written, note = report.write_outputs(out, doc, rows, timeline)
    except OSError as e:
        fallback = Path(tempfile.mkdtemp(prefix="pyturbo-bench-"))
        print(f"error: cannot write to {out} ({e.strerror or e}); the results go to {fallback} instead",
              file=sys.stderr)
        out, rc = fallback, 1
        written, note = report.write_outputs(out, doc, rows, timeline)
    print(f"\nfiles: {out}/ ({', '.join(written)})", file=stream)
    if note:
        print(note, file=stream)
    return rc

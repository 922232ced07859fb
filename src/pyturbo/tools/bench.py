"""`python -m pyturbo.bench`: stock vs pipelined prefill, measured in one run, on a default that needs no download.

With no arguments it synthesizes a benchmark model once (cached), starts local llama.cpp RPC workers on loopback,
and for a ladder of prompt lengths measures, in this process:
  stock       the standard path as llama-server drives it (n_batch 2048, n_ubatch 512)
  stock-best  the standard path with n_batch = the prompt length
  pipelined   pyturbo's pipelined path (n_batch 2048 calls, captured and replayed as one series)
  1 device    with --gpu over several devices: stock with every layer on the first device, the reference a split
              over GPUs (or stream devices of one GPU, see PYTURBO_GPU_STREAMS) is there to beat
It checks that the pipelined last-token logits equal stock's and prints the table; files go to --out.
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import platform
import statistics
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .. import _native
from . import synth, workers
from ..errors import PyturboError
from ..devices import list_devices
from ..model import Model, parse_endpoints

STOCK_BATCH, STOCK_UBATCH = 2048, 512
# measured (bench/results/): on CPU RPC stages ubatch 128 pipelines best at 4 stages and on the 2-core box
CPU_PIPELINE_UBATCH = 128


@dataclass
class Row:
    prompt_tokens: int
    ubatch: int
    stock_tps: float
    stock_best_tps: float
    pipelined_tps: float
    speedup: float            # pipelined vs stock, same process, same model and split
    speedup_best: float       # pipelined vs stock-best
    efficiency: float         # Σ stage busy ÷ (stages × wall) of the pipelined run
    ideal_speedup: float      # M·S/(M+S−1)
    ideal_efficiency: float   # M/(M+S−1)
    outputs_equal: bool
    path: str
    one_device_tps: float = float("nan")     # stock with all layers on the first device (--gpu), same process
    speedup_one_device: float = float("nan")  # pipelined vs that
    fallback_reason: str = ""
    runs: dict = field(default_factory=dict)


def default_setup() -> dict:
    """Workers and lengths suited to the machine: one worker per two cores (at least 2), up to 8."""
    cores = os.cpu_count() or 2
    n_workers = max(2, min(8, cores // 2))
    threads = max(1, cores // n_workers)
    preset = "bench-16l" if cores >= 8 else "bench-8l"
    lengths = [1024, 2048, 4096, 8192] if cores >= 8 else [1024, 2048, 4096]
    return {"workers": n_workers, "threads": threads, "preset": preset, "lengths": lengths}


def measure(ctx, tokens: np.ndarray, pipeline: bool, repeat: int):
    """Median seconds of `repeat` prefills from an empty cache; also the last result."""
    secs, res = [], None
    for _ in range(repeat):
        ctx.reset()
        res = ctx.prefill(tokens, pipeline=pipeline)
        secs.append(res.seconds)
    ctx.reset()
    return statistics.median(secs), res


def bench_tokens(model: Model, n: int) -> np.ndarray:
    return np.random.default_rng(n).integers(0, min(model.n_vocab, 32000), n).astype(np.int32)


def context_settings(n: int, args) -> dict:
    return dict(n_ctx=n + 64, n_threads=args.client_threads, flash_attn=args.flash_attn)


def measure_stock(model: Model, tokens: np.ndarray, args):
    """measure() of the standard path as llama-server drives it, after a warm-up."""
    with model.context(n_batch=STOCK_BATCH, n_ubatch=STOCK_UBATCH, **context_settings(len(tokens), args)) as ctx:
        ctx.prefill(tokens[: min(len(tokens), 64)])  # warm-up: first-use allocations on every device
        return measure(ctx, tokens, False, args.repeat)


def bench_length(model: Model, n: int, args, progress) -> list[tuple[Row, object]]:
    """stock and stock-best once, then pipelined for each ubatch size; one (Row, pipelined result) per ubatch."""
    tokens = bench_tokens(model, n)
    common = context_settings(n, args)
    stock = measure_stock(model, tokens, args)
    progress.update(1)
    best = None
    if not args.no_stock_best:
        with model.context(n_batch=max(n, STOCK_UBATCH), n_ubatch=STOCK_UBATCH, **common) as ctx:
            best = measure(ctx, tokens, False, args.repeat)
    progress.update(1)

    rows = []
    for ub in args.ubatches:
        runs = {"stock": stock, **({"stock-best": best} if best else {})}
        with model.context(n_batch=max(STOCK_BATCH, ub), n_ubatch=ub, max_in_flight=args.in_flight, **common) as ctx:
            ctx.prefill(tokens[: min(n, 2 * ub)], pipeline=True)  # warm-up: reserves the in-flight buffers
            # reference for the equality check: the standard path with the same batch and ubatch sizes, i.e. the
            # same kernels on the same shapes, so the comparison is bit for bit (stock itself when ub == 512)
            runs["reference"] = stock if ub == STOCK_UBATCH else measure(ctx, tokens, False, 1)
            runs["pipelined"] = measure(ctx, tokens, True, args.repeat)
        progress.update(1)
        t_stock, t_best = stock[0], best[0] if best else float("nan")
        t_pipe, r_pipe = runs["pipelined"]
        tl = r_pipe.timeline
        rows.append((Row(
            prompt_tokens=n, ubatch=ub,
            stock_tps=n / t_stock, stock_best_tps=n / t_best, pipelined_tps=n / t_pipe,
            speedup=t_stock / t_pipe, speedup_best=t_best / t_pipe,
            efficiency=tl.efficiency() if len(tl) else float("nan"),
            ideal_speedup=tl.ideal_speedup() if len(tl) else float("nan"),
            ideal_efficiency=tl.ideal_efficiency() if len(tl) else float("nan"),
            outputs_equal=bool(np.array_equal(r_pipe.logits, runs["reference"][1].logits)),
            path=r_pipe.path, fallback_reason=r_pipe.fallback_reason,
            runs={k: {"seconds": v[0], "path": v[1].path, "n_ubatches": v[1].n_ubatches} for k, v in runs.items()},
        ), r_pipe))
    return rows


TABLE_COLUMNS = ["prompt tokens", "ubatch", "stock tok/s", "stock-best tok/s", "pipelined tok/s", "speedup vs stock",
                 "efficiency", "ideal", "outputs equal"]


ONE_DEVICE_COLUMNS = ["1-device stock tok/s", "pipelined vs 1 device"]


def table(rows: list[Row]) -> str:
    one_device = any(r.one_device_tps == r.one_device_tps for r in rows)  # measured (not nan) somewhere
    columns = TABLE_COLUMNS + (ONE_DEVICE_COLUMNS if one_device else [])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        line = (f"| {r.prompt_tokens} | {r.ubatch} | {r.stock_tps:.0f} | {r.stock_best_tps:.0f} | "
                f"{r.pipelined_tps:.0f} | {r.speedup:.2f}x | {r.efficiency:.2f} | {r.ideal_speedup:.2f}x | "
                f"{'yes' if r.outputs_equal else 'NO'} |")
        if one_device:
            line += f" {r.one_device_tps:.0f} | {r.speedup_one_device:.2f}x |"
        lines.append(line)
    return "\n".join(lines)


def machine_info() -> dict:
    info = _native.build_info()
    return {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "processor": platform.processor(), "cuda_build": info["cuda"],
            "devices": [d["name"] + ": " + d["description"] for d in info["devices"]]}


def git_commit() -> str:
    """The commit measured: PYTURBO_COMMIT when set (a copied tree without .git, like the GPU machine's), else the
    checkout this runs in (the current directory, then the package's own)."""
    if os.environ.get("PYTURBO_COMMIT"):
        return os.environ["PYTURBO_COMMIT"]
    import subprocess
    for where in (Path.cwd(), Path(__file__).parent):
        try:
            out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                 cwd=where, timeout=5).stdout.strip()
        except Exception:
            continue
        if out:
            return out
    return "unknown"


def write_outputs(out: Path, rows: list[Row], settings: dict, best_pipe, machine: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    doc = {"date": dt.datetime.now().isoformat(timespec="seconds"), "commit": git_commit(), "machine": machine,
           "settings": settings, "results": [asdict(r) for r in rows],
           "timeline": best_pipe.timeline.to_records() if best_pipe is not None else []}
    (out / "results.json").write_text(json.dumps(doc, indent=2))
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[k for k in asdict(rows[0]) if k != "runs"])
        w.writeheader()
        for r in rows:
            w.writerow({k: v for k, v in asdict(r).items() if k != "runs"})
    report = [f"# pyturbo bench, {doc['date']}", "", table(rows), "",
              "Speedup: stock seconds ÷ pipelined seconds, both measured in this run on the same model and split. "
              "Efficiency: Σ stage busy ÷ (stages × wall) of the pipelined run; ideal: M·S/(M+S−1).", "",
              "## Settings", "```", json.dumps(settings, indent=2), "```", "", "## Machine", "```",
              json.dumps(machine, indent=2), "```", f"commit {doc['commit']}"]
    if best_pipe is not None and len(best_pipe.timeline):
        clocks = ", ".join(f"{d}: {c}" for d, c in best_pipe.timeline.clocks().items())
        report += ["", "## Occupancy of the longest pipelined run", "```", best_pipe.timeline.ascii(), "```",
                   f"Stage times taken by ({clocks}): cuda-event = timing events on the GPU, host = host clock."]
    (out / "report.md").write_text("\n".join(report) + "\n")
    try:
        plot_throughput(out / "throughput.png", rows)
        if best_pipe is not None and len(best_pipe.timeline):
            best_pipe.timeline.plot(out / "timeline.png", title=f"pipelined prefill, {best_pipe.n_tokens} tokens")
    except ImportError as e:
        print(f"note: no plots ({e})", file=sys.stderr)


def plot_throughput(path: Path, rows: list[Row]) -> None:
    try:
        from matplotlib.figure import Figure
        from matplotlib.backends.backend_agg import FigureCanvasAgg
    except ImportError:
        raise ImportError("plots need matplotlib: pip install 'pyturbo[plot]'") from None
    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    xs = [r.prompt_tokens for r in rows]
    for key, label in (("stock_tps", "stock"), ("stock_best_tps", "stock-best"), ("pipelined_tps", "pipelined")):
        ax.plot(xs, [getattr(r, key) for r in rows], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("prefill tok/s")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_args(argv):
    d = default_setup()
    ap = argparse.ArgumentParser(prog="python -m pyturbo.bench", description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="a GGUF model (default: a synthetic one, cached)")
    ap.add_argument("--preset", default=None, choices=sorted(synth.PRESETS), help=f"synthetic shape (default {d['preset']})")
    ap.add_argument("--rpc", help="existing RPC workers host:port,host:port (default: start local ones)")
    ap.add_argument("--workers", type=int, default=d["workers"], help=f"local RPC workers (default {d['workers']})")
    ap.add_argument("--threads", type=int, default=d["threads"], help=f"threads per local worker (default {d['threads']})")
    ap.add_argument("--client-threads", type=int, default=0,
                    help="threads of this process's CPU backend (default: 1 with RPC workers, all cores otherwise)")
    ap.add_argument("--gpu", action="store_true", help="split over the local GPUs instead of RPC workers")
    ap.add_argument("--devices", help="comma-separated devices to split over, e.g. CUDA0,CUDA1 or CUDA0,RPC0")
    ap.add_argument("--tensor-split", default="even", help="proportions a,b,... or 'even' (equal layers per device)")
    ap.add_argument("--lengths", help="comma-separated prompt lengths")
    ap.add_argument("--ubatch", default="auto",
                    help="pipelined n_ubatch; several values = a sweep, best per length (auto: 512 on GPUs, "
                         f"{CPU_PIPELINE_UBATCH} on CPU or RPC stages, where more, smaller ubatches fill the pipeline "
                         "at little cost per token)")
    ap.add_argument("--in-flight", type=int, default=0, help="ubatches in flight (0: stages + 1)")
    ap.add_argument("--flash-attn", choices=["on", "off", "auto"], default="auto")
    ap.add_argument("--repeat", type=int, default=1, help="median of N runs per mode")
    ap.add_argument("--no-stock-best", action="store_true", help="skip the stock-best mode (saves time on long prompts)")
    ap.add_argument("--no-one-device", action="store_true", help="with --gpu: skip stock on the first device alone")
    ap.add_argument("--quick", action="store_true", help="about a minute: tiny model, short prompts (CI, smoke)")
    ap.add_argument("--out", type=Path, help="output folder (default bench-out/DATE)")
    ap.add_argument("--json", action="store_true", help="print results.json to stdout instead of the table")
    args = ap.parse_args(argv)
    args.flash_attn = {"on": True, "off": False, "auto": "auto"}[args.flash_attn]
    if args.quick:
        args.preset = args.preset or "bench-small"
        args.lengths = args.lengths or "512,1024"
        args.workers = 2
        args.threads = 1
    args.preset = args.preset or d["preset"]
    if args.client_threads <= 0:
        # with local RPC workers the cores belong to them; this process only looks up token embeddings
        args.client_threads = (os.cpu_count() or 1) if (args.gpu or args.devices) else 1
    try:
        args.lengths = [int(x) for x in (args.lengths or ",".join(map(str, d["lengths"]))).split(",")]
        if args.ubatch == "auto":
            args.ubatch = str(STOCK_UBATCH if args.gpu else CPU_PIPELINE_UBATCH)
        args.ubatches = [int(x) for x in args.ubatch.split(",")]
    except ValueError:
        ap.error("--lengths and --ubatch take comma-separated integers")
    if any(n < 2 for n in args.lengths) or any(u < 1 for u in args.ubatches):
        ap.error("lengths must be >= 2 and ubatch sizes >= 1")
    if args.repeat < 1 or args.workers < 1 or args.threads < 1:
        ap.error("--repeat, --workers and --threads must be >= 1")
    if args.model is not None and not args.model.exists():
        ap.error(f"--model {args.model}: file not found")
    args.out = args.out or Path("bench-out") / dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return args


def bench_devices(args) -> list[str] | None:
    """The devices to split over: --devices, or with --gpu every CUDA device; None: the RPC workers."""
    devices = args.devices.split(",") if args.devices else None
    if args.gpu and devices is None:
        devices = [d.name for d in list_devices() if d.name.startswith("CUDA")]
        if not devices:
            raise PyturboError("--gpu: no CUDA devices (is this a CUDA build? see pyturbo.build_info())")
    return devices


def open_model(args, model_path: Path, endpoints: list[str], devices: list[str] | None) -> Model:
    split = args.tensor_split if args.tensor_split == "even" else [float(x) for x in args.tensor_split.split(",")]
    if devices is not None and len(devices) < 2:
        split = None
    return Model(model_path, rpc_servers=endpoints or None, devices=devices, tensor_split=split)


def one_device_stock(args, model_path: Path, device: str) -> dict[int, float]:
    """tok/s of stock prefill with every layer on `device`, per prompt length (loaded before the split model, so
    the two are never in memory together)."""
    out = {}
    print(f"measuring stock on {device} alone (the 1-device reference)", file=sys.stderr)
    with Model(model_path, devices=[device]) as model:
        for n in args.lengths:
            out[n] = n / measure_stock(model, bench_tokens(model, n), args)[0]
    return out


def run(args) -> int:
    from tqdm import tqdm

    model_path = args.model or synth.cached_model(args.preset, progress=True)
    too_long = [n for n in args.lengths if n > 131072]
    if too_long:
        raise SystemExit(f"error: prompt lengths {too_long} exceed what this benchmark supports (131072)")
    settings = {"model": str(model_path), "preset": None if args.model else args.preset, "lengths": args.lengths,
                "ubatches": args.ubatches, "stock": {"n_batch": STOCK_BATCH, "n_ubatch": STOCK_UBATCH},
                "repeat": args.repeat, "tensor_split": args.tensor_split, "flash_attn": str(args.flash_attn)}

    pool = None
    endpoints = parse_endpoints(args.rpc) if args.rpc else []
    if not endpoints and not args.gpu and not args.devices:
        print(f"starting {args.workers} local RPC workers x {args.threads} threads", file=sys.stderr)
        pool = workers.WorkerPool(args.workers, threads=args.threads)
        endpoints = pool.endpoints
        settings.update(workers=args.workers, threads_per_worker=args.threads)
    rows, sweep, best_pipe = [], [], None
    try:
        devices = bench_devices(args)
        one_device = {}
        if devices and len(devices) > 1 and not args.no_one_device and all(d.startswith("CUDA") for d in devices):
            one_device = one_device_stock(args, model_path, devices[0])
        with open_model(args, model_path, endpoints, devices) as model:
            settings["devices"] = model.devices
            n_ctx_max = max(args.lengths) + 64
            if model.n_ctx_train and n_ctx_max > 4 * model.n_ctx_train:
                print(f"note: prompts up to {max(args.lengths)} exceed the model's training context", file=sys.stderr)
            steps = len(args.lengths) * (2 + len(args.ubatches))
            with tqdm(total=steps, desc="bench", unit="run", file=sys.stderr) as progress:
                for n in args.lengths:
                    results = bench_length(model, n, args, progress)
                    for r, _ in results:
                        if n in one_device:
                            r.one_device_tps = one_device[n]
                            r.speedup_one_device = r.pipelined_tps / one_device[n]
                    sweep += [r for r, _ in results]
                    row, best_pipe = max(results, key=lambda rp: rp[0].pipelined_tps)
                    rows.append(row)
    finally:
        if pool is not None:
            pool.stop()

    machine = machine_info()
    if len(args.ubatches) > 1:
        settings["sweep"] = [asdict(r) for r in sweep]
    write_outputs(args.out, rows, settings, best_pipe, machine)
    if args.json:
        print((args.out / "results.json").read_text())
    else:
        print(f"devices: {', '.join(settings['devices'])}; model: {model_path.name}")
        print(table(rows))
        print(f"\nfiles: {args.out}/ (report.md, results.json, results.csv, throughput.png, timeline.png)")
    bad = [(r.prompt_tokens, r.ubatch) for r in sweep if not r.outputs_equal]
    if bad:
        print(f"ERROR: pipelined logits differ from the standard path at (length, ubatch) {bad}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except PyturboError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

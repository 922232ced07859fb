"""The command line: options, their checks (every bad option is an argparse error, found before anything runs),
and the run itself (workers, models, the lengths, then the table, then the files)."""
from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import math
import shutil
import sys
from pathlib import Path

from .. import links, synth
from ...devices import list_devices
from ...errors import PyturboError
from ...model import EXPERT_TENSORS, check_host_tensors, gguf_block_count, parse_endpoints
from . import report
from .layout import LARGE_PRESET_BYTES, PRESET_NAMES, default_setup, describe_bytes, preset_bytes
from .measure import CPU_PIPELINE_UBATCH, STOCK_UBATCH

DEFAULT_REPEAT = 3
QUICK = {"preset": "bench-small", "lengths": "512,1024", "repeat": 2}

DESCRIPTION = """\
stock llama.cpp vs pyturbo's pipelined prefill, measured in one process on the same model and split.

With no options it writes a synthetic model once (cached in ~/.cache/pyturbo), starts local llama.cpp RPC workers on
127.0.0.1 (a layout chosen from this machine's cores, and why, is printed), and for each prompt length runs, interleaved
and repeated: stock at llama-server's defaults, stock at the pipelined ubatch, a small sweep of stock settings, the same
model in one process with every core (the ceiling a split of one CPU must match), and the pipelined path. It checks that
the pipelined outputs equal stock's bit for bit and prints a table with a legend; files go to --out. The default
column's auto calibrates afresh in every run, in memory: the stored calibration file is neither read nor written.

Duration: the default run (4 workers x 1 thread on 2 cores, bench-8l, prompts of 1024 and 4096 tokens, 7-8 settings x
3 runs each, after auto's calibration) took about 9 minutes on a 2-core box (--no-sweep saves about a
quarter); --quick takes 20-40 seconds there (bench/results/2026-11-26-default-2core.md).
Machines with more cores are faster; when other work shares the cores, it takes longer and the spreads grow.

Across hosts, on one machine: --link-rate MBIT [--link-model coordinator|per-worker] runs the local workers behind
shaped network links (network namespaces and tc; root and iproute2 needed) and also reports the bytes through the
coordinator's link per ubatch; --link-rate 0 is the same path unshaped, the baseline."""


def build_parser(d: dict) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m pyturbo.bench", description=DESCRIPTION,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add = ap.add_argument
    add("--model", type=Path, help="a GGUF model (default: a synthetic one, cached)")
    add("--preset", choices=PRESET_NAMES, help=f"synthetic model shape (default {d['preset']}; gpt-oss-*: "
        "GPT-OSS-shaped mixture-of-experts, pyturbo.synth.GPT_OSS_PRESETS)")
    add("--yes", action="store_true", help=f"write a synthetic preset over {describe_bytes(LARGE_PRESET_BYTES)} "
        "(8b: ~16 GB, 70b: ~40 GB, gpt-oss-20b: ~13 GB, gpt-oss-120b: ~61 GB) without asking")
    add("--host-tensors", metavar="PATTERN", help="keep the weights whose names match this regular expression in host "
        "memory, computed by this process's CPU, in every mode (Model(host_tensors=); llama.cpp's --override-tensor "
        "PATTERN=CPU)")
    add("--experts-in-host-memory", action="store_true", help="the routed experts of a mixture-of-experts model in "
        f"host memory (Model(experts_in_host_memory=True): --host-tensors '{EXPERT_TENSORS}', llama.cpp's --cpu-moe)")
    add("--rpc", help="existing RPC workers host:port,host:port (default: start local ones)")
    add("--workers", type=int, help=f"local RPC workers = pipeline stages (default here {d['workers']})")
    add("--threads", type=int, help=f"threads per local worker (default here {d['threads']})")
    add("--client-threads", type=int, default=0,
        help="threads of this process's CPU backend (default: 1 with RPC workers; else pyturbo's default, every "
        "core where the CPU holds layers and 4 where it only looks up token embeddings)")
    add("--gpu", action="store_true", help="split over the local GPUs instead of RPC workers")
    add("--devices", help="comma-separated devices to split over, e.g. CUDA0,CUDA1 or CUDA0,RPC0")
    add("--tensor-split", default="even", help="proportions a,b,... (one per device), 'even' (equal layers per "
        "device) or 'auto' (layers balanced from measured stage times, measured once and stored: pyturbo.balance)")
    add("--lengths", help=f"comma-separated prompt lengths (default here {','.join(map(str, d['lengths']))})")
    add("--ubatch", default="auto", help=f"pipelined n_ubatch; several values give a row each (auto: {STOCK_UBATCH} "
        f"on GPUs, {CPU_PIPELINE_UBATCH} on CPU or RPC stages, where more, smaller ubatches fill the pipeline at little "
        "cost per token)")
    add("--in-flight", type=int, default=0, help="ubatches in flight (0: stages + 1)")
    add("--first-ubatch", type=int, default=0, help="opt-in: the pipelined modes start each prompt with a ubatch of "
        "this many tokens (Context(first_ubatch=)); their logits are then checked against stock within a tolerance "
        "instead of bit for bit (0: uniform ubatches)")
    add("--flash-attn", choices=["on", "off", "auto"], default="auto")
    add("--repeat", type=int, help=f"runs per setting, interleaved; the table shows the median (default {DEFAULT_REPEAT})")
    add("--no-sweep", "--no-stock-best", dest="no_sweep", action="store_true",
        help="skip stock's sweep: stock-best is then the better of stock and stock same-ub (saves time)")
    add("--no-ceiling", "--no-one-device", dest="no_ceiling", action="store_true",
        help="skip the one-process ceiling (CPU) or the 1-device reference (--gpu)")
    add("--quick", action="store_true",
        help=f"20-40 seconds on a 2-core machine (CI, smoke test): sets the model to {QUICK['preset']}, --lengths to "
        f"{QUICK['lengths']}, --repeat to {QUICK['repeat']} and --no-sweep, unless given; the layout (--workers, "
        "--threads) stays; what it sets is printed")
    add("--link-rate", type=float, metavar="MBIT", help="run the local workers behind shaped network links of this "
        "rate, Mbit/s each way (0: the same links unshaped, the baseline to compare with): each worker in a network "
        "namespace, joined by a bridge, tc htb on the links (pyturbo.tools.links); needs root and iproute2 (ip, tc). "
        "A second table gives the bytes through the coordinator's link per ubatch")
    add("--link-model", choices=links.MODELS, help="with --link-rate: 'coordinator' (default), one link at this "
        "process shared by all workers (worker-to-worker traffic is not shaped), or 'per-worker', a link per worker")
    add("--link-delay", type=float, metavar="MS", help="with --link-rate: one-way delay per shaped link, ms (netem)")
    add("--out", type=Path, help="output folder (default bench-out/DATE); checked for writing before the run")
    add("--json", action="store_true", help="print results.json to stdout instead of the table")
    return ap


def parse_args(argv=None) -> argparse.Namespace:
    d = default_setup()
    ap = build_parser(d)
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    check_args(ap, args, d)
    return args


def int_list(ap, name: str, text: str, lo: int, hi: int) -> list[int]:
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        ap.error(f"{name} takes comma-separated integers, not {text!r}")
    if not values or any(not lo <= v <= hi for v in values):
        ap.error(f"{name} values must be between {lo} and {hi}, not {text!r}")
    return values


def device_names() -> list[str]:
    """Names of the devices of this build (RPC devices appear once their workers are added)."""
    return [dev.name for dev in list_devices()]


def check_args(ap, args, d: dict) -> None:
    """Every check that needs no worker and no model load; each failure is an argparse error (exit 2)."""
    if args.quick:
        apply_quick(args)
    args.preset = args.preset or d["preset"]
    args.repeat = DEFAULT_REPEAT if args.repeat is None else args.repeat
    args.workers = d["workers"] if args.workers is None else args.workers
    args.threads = d["threads"] if args.threads is None else args.threads
    for name in ("repeat", "workers", "threads"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1, not {getattr(args, name)}")
    for name in ("client_threads", "in_flight", "first_ubatch"):
        if getattr(args, name) < 0:
            ap.error(f"--{name.replace('_', '-')} must be >= 0 (0: automatic), not {getattr(args, name)}")
    args.lengths = int_list(ap, "--lengths", args.lengths or ",".join(map(str, d["lengths"])), 2, 131072)
    if args.gpu and args.rpc:
        ap.error("--gpu and --rpc exclude each other (to mix GPUs and workers: --rpc ... --devices CUDA0,RPC0)")
    try:
        args.endpoints = parse_endpoints(args.rpc) if args.rpc is not None else []
    except ValueError as e:
        ap.error(f"--rpc: {e}")
    if args.rpc is not None and not args.endpoints:
        ap.error("--rpc: give at least one host:port")
    check_links(ap, args)
    args.devices = check_devices(ap, args)
    args.on_gpu = any(dev.startswith("CUDA") for dev in args.devices or [])
    args.ubatches = ([STOCK_UBATCH if args.on_gpu else CPU_PIPELINE_UBATCH] if args.ubatch == "auto"
                     else int_list(ap, "--ubatch", args.ubatch, 1, 65536))
    args.flash_attn = {"on": True, "off": False, "auto": "auto"}[args.flash_attn]
    if args.first_ubatch and not 0 < args.first_ubatch <= min(args.ubatches):
        ap.error(f"--first-ubatch must be from 1 to the smallest --ubatch ({min(args.ubatches)}), not {args.first_ubatch}")
    args.n_stages = len(args.devices) if args.devices else len(args.endpoints) or args.workers
    if args.model is not None:
        args.n_layer = check_model(ap, args.model)
    else:
        args.n_layer = synth.preset_shape(args.preset).n_layer
    try:
        args.host_tensors = check_host_tensors(args.host_tensors, args.experts_in_host_memory)
    except ValueError as e:
        ap.error(f"--host-tensors / --experts-in-host-memory: {e}")
    args.split = check_split(ap, args)
    args.reference = reference_kind(args)
    args.layout = layout_text(args, d) + (f"; weights matching {args.host_tensors!r} in host memory, on this "
                                          "process's CPU" if args.host_tensors else "")
    args.out = args.out or Path("bench-out") / dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    why = report.check_writable(args.out)
    if why:
        ap.error(f"--out {why}")
    if args.model is None:
        confirm_preset(ap, args.preset, args.yes)


def apply_quick(args) -> None:
    """--quick fills in what was not given, and says what it set."""
    set_, kept = [], []
    if args.model is None and args.preset is None:
        args.preset = QUICK["preset"]
        set_.append(f"model {QUICK['preset']}")
    elif args.preset or args.model:
        kept.append("--model" if args.model else "--preset")
    for name in ("lengths", "repeat"):
        if getattr(args, name) is None:
            setattr(args, name, QUICK[name])
            set_.append(f"--{name} {QUICK[name]}")
        else:
            kept.append(f"--{name}")
    if not args.no_sweep:
        args.no_sweep = True
        set_.append("--no-sweep")
    print(f"--quick sets: {', '.join(set_) or 'nothing'}" + (f"; kept as given: {', '.join(kept)}" if kept else "")
          + "; the layout (--workers, --threads) is not changed", file=sys.stderr)


def check_links(ap, args) -> None:
    """--link-rate/--link-model/--link-delay: the workers are local ones, and this machine can shape links."""
    if args.link_rate is None:
        for name in ("link_model", "link_delay"):
            if getattr(args, name) is not None:
                ap.error(f"--{name.replace('_', '-')} goes with --link-rate")
        return
    if args.rpc is not None or args.gpu or args.devices is not None:
        ap.error("--link-rate puts the bench's own local workers behind links: not with --rpc, --gpu or --devices")
    if not 0 <= args.link_rate < 1e6:
        ap.error(f"--link-rate is in Mbit/s, > 0 (0: unshaped), not {args.link_rate:g}")
    args.link_model = args.link_model or "coordinator"
    args.link_delay = args.link_delay or 0.0
    if not 0 <= args.link_delay <= 10000:
        ap.error(f"--link-delay must be from 0 to 10000 ms, not {args.link_delay:g}")
    why = links.delay_unavailable_reason() if args.link_delay else links.unavailable_reason()
    if why:
        ap.error(f"--link-rate needs root and iproute2 (ip, tc), and network namespaces: {why}")


def link_shaping(args) -> "links.Shaping | None":
    if getattr(args, "link_rate", None) is None:
        return None
    return links.Shaping(args.link_model, args.link_rate or None, args.link_delay)


def check_devices(ap, args) -> list[str] | None:
    """--devices (or, with --gpu, every CUDA device) checked against this build's devices; None: the RPC workers."""
    known = device_names()
    if args.devices is None:
        if not args.gpu:
            return None
        cuda = [name for name in known if name.startswith("CUDA")]
        if not cuda:
            ap.error("--gpu: this build has no CUDA devices (see pyturbo.build_info())")
        return cuda
    names = [x.strip() for x in args.devices.split(",")]
    rpc = [f"RPC{i}" for i in range(len(args.endpoints))]
    for name in names:
        if name not in known and name not in rpc:
            avail = ", ".join([k for k in known if not k.startswith("RPC")] + (rpc or ["RPC0... (with --rpc)"]))
            ap.error(f"--devices: no device named {name!r}; available: {avail}")
    if len(set(names)) != len(names):
        ap.error(f"--devices: {args.devices!r} names a device twice")
    return names


def check_model(ap, path: Path) -> int:
    """The model's layer count; a clean error for a missing, unreadable, truncated or corrupt file."""
    if not path.is_file():
        ap.error(f"--model {path}: file not found" if not path.exists() else f"--model {path}: not a file")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            ap.error(f"--model {path}: not a GGUF file (it starts with {magic!r})")
        return gguf_block_count(path)
    except SystemExit:
        raise
    except Exception as e:      # the gguf reader raises ValueError, IndexError, KeyError... on a damaged file
        ap.error(f"--model {path}: cannot read it as GGUF, truncated or corrupt? ({type(e).__name__}: {e})")


def check_split(ap, args) -> list[float] | str | None:
    """--tensor-split as Model takes it: None for one stage, 'even', or one proportion per stage."""
    if args.tensor_split in ("even", "auto"):
        if args.n_stages >= 2 and args.n_layer < args.n_stages:
            ap.error(f"cannot split {args.n_layer} layers over {args.n_stages} stages: use fewer workers or devices")
        return args.tensor_split if args.n_stages >= 2 else None
    try:
        split = [float(x) for x in args.tensor_split.split(",")]
    except ValueError:
        ap.error(f"--tensor-split takes 'even', 'auto' or comma-separated numbers, not {args.tensor_split!r}")
    if any(not math.isfinite(x) or x < 0 for x in split) or sum(split) <= 0:
        ap.error(f"--tensor-split proportions must be >= 0 with a positive sum, not {args.tensor_split!r}")
    if len(split) != args.n_stages:
        ap.error(f"--tensor-split has {len(split)} proportions for {args.n_stages} stages")
    return split


def is_loopback(endpoint: str) -> bool:
    host = endpoint.rpartition(":")[0].strip("[]")
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def reference_kind(args) -> str | None:
    """'1 device' (a split over GPUs), 'ceiling' (CPU stages on this machine) or None (not measurable here)."""
    if args.no_ceiling:
        return None
    if args.devices and all(dev.startswith("CUDA") for dev in args.devices):
        return "1 device" if len(args.devices) > 1 else None
    if args.devices is None and all(map(is_loopback, args.endpoints)):
        return "ceiling"
    return None


def layout_text(args, d: dict) -> str:
    if args.devices:
        return f"split over {', '.join(args.devices)}"
    if args.endpoints:
        return f"{len(args.endpoints)} RPC workers at {', '.join(args.endpoints)}"
    shaping = link_shaping(args)
    behind = f"; behind links: {shaping.describe()}" if shaping else ""
    if (args.workers, args.threads) == (d["workers"], d["threads"]):
        return d["why"] + behind
    text = (f"{args.workers} local RPC workers x {args.threads} thread{'s' if args.threads > 1 else ''} (as asked; "
            f"the default here: {d['workers']} x {d['threads']})")
    if args.workers < 3:
        text += (f"; note: stock llama.cpp already overlaps {args.workers} RPC stage{'s' if args.workers > 1 else ''} "
                 "on a CPU, so expect about 1.0x (the effect needs 3 or more stages)")
    return text + behind


def cached_preset(preset: str) -> bool:
    """Whether synth.cached_model(preset) would find its file (the name spells out the shape; see synth)."""
    return synth.cached_path(preset).is_file()


def confirm_preset(ap, preset: str, yes: bool) -> None:
    """Ask before writing a large synthetic model; refuse when the disk cannot hold it."""
    size = preset_bytes(preset)
    if size <= LARGE_PRESET_BYTES or cached_preset(preset):
        return
    cache = synth.default_cache_dir()
    where = next(p for p in [cache, *cache.parents] if p.exists())
    free = shutil.disk_usage(where).free
    if free < size * 1.05:
        ap.error(f"--preset {preset} needs {describe_bytes(size)} in {cache}, but only {describe_bytes(free)} is free "
                 "(set PYTURBO_CACHE to another disk)")
    msg = f"--preset {preset} writes a {describe_bytes(size)} synthetic model to {cache} (once; it is cached)"
    if yes:
        print(f"note: {msg}", file=sys.stderr)
        return
    if not sys.stdin.isatty():
        ap.error(f"{msg}; pass --yes to go ahead")
    if input(f"{msg}. Go ahead? [y/N] ").strip().lower() not in ("y", "yes"):
        ap.error("not confirmed; nothing written")


def main(argv: list[str] | None = None) -> int:
    from .run import run
    args = parse_args(argv)
    try:
        return run(args)
    except (PyturboError, ValueError) as e:     # e.g. a worker that went away, a model llama.cpp cannot load
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing written", file=sys.stderr)
        return 130

"""What the benchmark shows and keeps: the table and its legend, results.json/.csv, report.md and the plots.

The table is printed before any file is written, and every file is written atomically (a temporary file in the
same folder, then renamed), so a run is never lost to a full or read-only disk half-way through a write.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import platform
import statistics
import subprocess
import tempfile
from dataclasses import fields
from pathlib import Path

from ... import settings
from ...results import FIRST_UBATCH_TOLERANCE
from ...devices import build_info, usable_cpu_cores
from .measure import CPU_SWEEP_UBATCHES, GPU_SWEEP_UBATCHES, PIPELINE_MODES, STOCK_BATCH, STOCK_UBATCH, Row


def columns(modes: list[str], reference: str = "ceiling") -> list[str]:
    """Header of the table; reference: "ceiling" (CPU/RPC layouts) or "1 device" (--gpu)."""
    head, *extra = modes
    cols = ["prompt tokens", "ubatch", "stock", "stock same-ub", "stock-best", "stock-best at", reference, head,
            f"{head} vs stock-best", f"vs {reference}"]
    for m in extra:
        cols += [m, f"{m} vs stock-best"]
    return cols + ["efficiency", "bound", "outputs equal"]


TABLE_COLUMNS = columns([name for name, _ in PIPELINE_MODES])


def median_spread(values) -> str:
    """'median (min-max)' of tok/s values, as the bench scripts under bench/ print their cells."""
    return f"{statistics.median(values):.0f} ({min(values):.0f}-{max(values):.0f})"


def _tps(med: float, lo: float, hi: float) -> str:
    if math.isnan(med):
        return "-"
    return f"{med:.0f}" + (f" ({lo:.0f}-{hi:.0f})" if f"{lo:.0f}" != f"{hi:.0f}" else "")


def _run_tps(row: Row, key: str) -> str:
    r = row.runs.get(key)
    return _tps(r["tps"], r["tps_min"], r["tps_max"]) if r else "-"


def _ratio(x: float, lo: float | None = None, hi: float | None = None) -> str:
    if math.isnan(x):
        return "-"
    spread = lo is not None and hi is not None and f"{lo:.2f}" != f"{hi:.2f}"
    return f"{x:.2f}x" + (f" ({lo:.2f}-{hi:.2f})" if spread else "")


def cells(r: Row) -> list[str]:
    ub_batch = max(STOCK_BATCH, r.ubatch)
    head, *extra = PIPELINE_MODES
    m = r.modes[head[0]]
    out = [str(r.prompt_tokens), str(r.ubatch), _run_tps(r, f"stock {STOCK_BATCH}/{STOCK_UBATCH}"),
           _run_tps(r, f"stock {ub_batch}/{r.ubatch}"), _run_tps(r, r.stock_best_run), r.stock_best_setting,
           _run_tps(r, r.ceiling_run), _tps(m["tps"], m["tps_min"], m["tps_max"]),
           _ratio(m["speedup"], m["speedup_low"], m["speedup_high"]),
           "-" if math.isnan(r.vs_ceiling) else f"{r.vs_ceiling:.2f}"]
    for name, _ in extra:
        e = r.modes[name]
        out += [_tps(e["tps"], e["tps_min"], e["tps_max"]), _ratio(e["speedup"], e["speedup_low"], e["speedup_high"])]
    eff = "-" if math.isnan(r.efficiency) else f"{r.efficiency:.2f} (max {r.ideal_efficiency:.2f})"
    bound = "-" if math.isnan(r.ideal_speedup) else f"{r.ideal_speedup:.2f}x (M={r.n_ubatches}, S={r.n_stages})"
    if r.first_ubatch:   # other kernel shapes than stock same-ub: agreement within the stated tolerance
        equal = f"{'within tol.' if r.outputs_equal else 'NO'} (max diff {r.max_logit_diff:.2g})"
    else:
        equal = "yes" if r.outputs_equal else "NO"
    return out + [eff, bound, equal]


def link_table(rows: list[Row], n_embd: int, links_text: str) -> str:
    """Behind links (--link-rate): the bytes through the coordinator's link per ubatch of every setting run on the
    split model, medians, against A = n_ubatch x n_embd x 4 bytes (one boundary activation in F32)."""
    out = [f"bytes through the coordinator's link per ubatch ({links_text}; medians; sent = to the workers; "
           "A = n_ubatch x n_embd x 4, one activation)", "",
           "| prompt tokens | setting | path | sent per ubatch | received per ubatch | sent+received / A |",
           "|---|---|---|---|---|---|"]
    seen = set()
    for r in rows:
        if r.prompt_tokens in seen:
            continue
        seen.add(r.prompt_tokens)
        for key, run in r.runs.items():
            if "coordinator_sent_per_ubatch" not in run:
                continue
            sent, received = run["coordinator_sent_per_ubatch"], run["coordinator_received_per_ubatch"]
            a = run["n_ubatch"] * n_embd * 4
            path = "/".join(sorted(set(run["paths"]))) + (f" ({run['transfers']})" if run.get("transfers") else "")
            out.append(f"| {r.prompt_tokens} | {key} | {path} | {sent / 1024:.0f} KiB | {received / 1024:.0f} KiB | "
                       f"{(sent + received) / a:.2f} |")
    return "\n".join(out)


def table(rows: list[Row], reference: str = "ceiling") -> str:
    """A markdown table, padded so that it also reads on a terminal."""
    header = columns([name for name, _ in PIPELINE_MODES], reference)
    body = [cells(r) for r in rows]
    width = [max(len(c) for c in col) for col in zip(header, *body)]
    line = lambda cs: "| " + " | ".join(c.ljust(w) for c, w in zip(cs, width)) + " |"   # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in width) + "|"] + [line(b) for b in body])


def legend(info: dict) -> str:
    """What each column means (info: repeat, ubatches, sweep, gpu, reference, cores, ceiling_threads, ceiling_ubs)."""
    sweep = (GPU_SWEEP_UBATCHES if info["gpu"] else CPU_SWEEP_UBATCHES) if info["sweep"] else ()
    ubs = sorted({STOCK_UBATCH, *info["ubatches"], *sweep})
    tried = ", ".join(f"{STOCK_BATCH}/{u}" for u in ubs) + (f", prompt/{STOCK_UBATCH} above {STOCK_BATCH} tokens" if sweep else "")
    head = PIPELINE_MODES[0][0]
    modes = "; ".join(f"{name}: prefill(pipeline={value!r})" for name, value in PIPELINE_MODES)
    ref_name = info["reference"]
    if ref_name == "1 device":
        ref = ("stock (n_batch 2048, n_ubatch 512) with every layer on the first device alone, measured before the "
               "split (not interleaved): what a split over GPUs is there to beat")
    elif info["ceiling"]:
        ref = (f"the same model in ONE process with all {info['cores']} cores ({info['ceiling_threads']} threads), no "
               f"split, best of n_ubatch {'/'.join(map(str, info['ceiling_ubs']))}: a split of this machine's CPU is "
               "worth running only where it matches or beats this")
    else:
        ref = "not measured here (remote workers, a mixed layout, or --no-ceiling)"
    items = [
        ("stock", "llama.cpp's standard path at llama-server's defaults (n_batch 2048, n_ubatch 512), same model and "
                  "split"),
        ("stock same-ub", "the standard path at the pipelined n_ubatch ('ubatch'): the same kernels; 'outputs equal' "
                          "compares with it"),
        ("stock-best", f"the fastest standard-path setting tried (n_batch/n_ubatch {tried}); 'stock-best at' names it"),
        (ref_name, ref),
        (head, f"pyturbo's pipelined prefill at n_ubatch 'ubatch' ({modes})"),
        (f"{head} vs stock-best", f"THE SPEED-UP: stock-best median seconds / {head} median seconds (in brackets: the "
                                  "same ratio round by round)"),
        (f"vs {ref_name}", f"{head} median tok/s / {ref_name} median tok/s"),
        ("efficiency", "sum of stage busy time / (S x wall time) of the pipelined run; max = M/(M+S-1), what filling "
                       "and draining the pipeline leaves"),
        ("bound", "M*S/(M+S-1): the most a pipeline of S equal stages gains over running them one after another "
                  "(M = ubatches of the prompt, S = stages)"),
        ("outputs equal", "the last-token logits of every pipelined run are bit-identical to stock same-ub's")]
    if info.get("first_ubatch"):
        items[-1] = ("outputs equal", f"the pipelined modes ran with first_ubatch={info['first_ubatch']} (opt-in: the "
                     "first ubatch that size, then n_ubatch each): other kernel shapes than stock same-ub, so their "
                     f"logits must agree within {FIRST_UBATCH_TOLERANCE:g} of the largest and pick the same top token "
                     "('within tol.', the largest difference in brackets); stock and stock-best keep uniform ubatches")
    width = max(len(label) for label, _ in items)
    runs = (f"median of {info['repeat']} runs (min-max); the settings ran interleaved (stock, {head}, stock, ...), "
            "the order rotated each round" if info["repeat"] > 1 else "one run each (--repeat 1: no spread)")
    if info.get("gpu"):
        runs += "; one untimed round of every setting ran first (the schedule's round -1)"
    return "\n".join([f"tok/s cells: {runs}."]
                     + [f"{label:<{width}}  {text}" for label, text in items])


# ---- files -----------------------------------------------------------------------------------------------------------

def check_writable(out: Path) -> str | None:
    """Why `out` cannot take the results (None: it can), found before anything runs; creates nothing."""
    target = out
    while not target.exists():
        if target.parent == target:
            return f"{out}: no existing parent folder"
        target = target.parent
    if not target.is_dir():
        return f"{out}: {target} is a file, not a folder"
    try:
        with tempfile.NamedTemporaryFile(dir=target, prefix=".pyturbo-bench-check-"):
            pass
    except OSError as e:
        return f"{out}: cannot write in {target} ({e.strerror or e})"
    return None


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write to a temporary file next to `path`, then rename it over `path`: readers see all or nothing."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def csv_text(rows: list[Row]) -> str:
    names = [f.name for f in fields(Row) if f.name not in ("modes", "runs")]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=names)
    w.writeheader()
    for r in rows:
        w.writerow({k: getattr(r, k) for k in names})
    return buf.getvalue()


def report_md(doc: dict, rows: list[Row], timeline) -> str:
    info = doc["table"]
    lines = [f"# pyturbo bench, {doc['date']}", "", f"`{doc['command']}`", "", f"Layout: {doc['layout']['text']}", "",
             table(rows, info["reference"]), "", "```", legend(info), "```", "",
             f"Load average (1/5/15 min) before: {doc['machine']['load_before']}, after: "
             f"{doc['machine']['load_after']} on {doc['machine']['cpus']} cores.", "",
             "## Every run (tok/s, in round order)", ""]
    seen = set()
    for r in rows:
        for key, run in r.runs.items():
            if (r.prompt_tokens, key) not in seen:
                seen.add((r.prompt_tokens, key))
                tps = ", ".join(f"{r.prompt_tokens / s:.0f}" for s in run["seconds"])
                lines.append(f"- {r.prompt_tokens} tokens, {key}: {tps}")
    lines += ["", "## Settings", "```", json.dumps(doc["settings"], indent=2), "```", "", "## Machine", "```",
              json.dumps(doc["machine"], indent=2), "```", f"commit {doc['commit']}"]
    if timeline is not None and len(timeline):
        clocks = ", ".join(f"{d}: {c}" for d, c in timeline.clocks().items())
        lines += ["", "## Occupancy of the longest pipelined run (the run closest to its median)", "```",
                  timeline.ascii(), "```",
                  f"Stage times taken by ({clocks}): cuda-event = timing events on the GPU, host = host clock."]
    return "\n".join(lines) + "\n"


def write_outputs(out: Path, doc: dict, rows: list[Row], timeline) -> tuple[list[str], str]:
    """Write every output into `out`; returns (names written, a note about plots)."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "results.json", json.dumps(doc, indent=2, default=str))
    atomic_write(out / "results.csv", csv_text(rows))
    atomic_write(out / "report.md", report_md(doc, rows, timeline))
    written = ["report.md", "results.json", "results.csv"]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return written, ("no plots: install matplotlib (pip install matplotlib, or pip install '.[plot]' in the "
                         "pyturbo checkout)")
    atomic_write(out / "throughput.png", plot_throughput(rows, doc["table"]["reference"]))
    written.append("throughput.png")
    if timeline is not None and len(timeline):
        fd, tmp = tempfile.mkstemp(dir=out, prefix=".timeline.", suffix=".png")
        os.close(fd)
        try:
            timeline.plot(tmp, title=f"pipelined prefill, {rows[-1].prompt_tokens} tokens")
            os.replace(tmp, out / "timeline.png")
        finally:
            Path(tmp).unlink(missing_ok=True)
        written.append("timeline.png")
    return written, ""


def plot_throughput(rows: list[Row], reference: str) -> bytes:
    """PNG: median tok/s against prompt length (bars: min-max), y-axis from zero."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    first = {}
    for r in rows:                                 # the stock settings are shared by the rows of one length
        first.setdefault(r.prompt_tokens, r)
    lines = [("stock (2048/512)", lambda r: f"stock {STOCK_BATCH}/{STOCK_UBATCH}", first.values()),
             ("stock-best", lambda r: r.stock_best_run, first.values()),
             (reference, lambda r: r.ceiling_run, first.values())]
    for name, _ in PIPELINE_MODES:
        for ub in sorted({r.ubatch for r in rows}):
            lines.append((f"{name} (ubatch {ub})", lambda r, name=name: r.modes[name]["run"],
                          [r for r in rows if r.ubatch == ub]))
    for label, key_of, subset in lines:
        pts = [(r.prompt_tokens, r.runs[key_of(r)]) for r in subset if key_of(r) in r.runs]
        if not pts:
            continue
        xs = [x for x, _ in pts]
        med = [p["tps"] for _, p in pts]
        err = [[m - p["tps_min"] for m, (_, p) in zip(med, pts)], [p["tps_max"] - m for m, (_, p) in zip(med, pts)]]
        ax.errorbar(xs, med, yerr=err, marker="o", capsize=3, label=label,
                    linestyle="--" if label == reference else "-")
    ax.set_xscale("log", base=2)
    lengths = sorted(first)
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.minorticks_off()
    ax.set_ylim(bottom=0)
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("prefill tok/s (median, bars: min-max)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


# ---- where it ran ----------------------------------------------------------------------------------------------------

def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def machine_info() -> dict:
    info = build_info()
    return {"platform": platform.platform(), "python": platform.python_version(), "cpus": usable_cpu_cores(),
            "processor": platform.processor(), "cuda_build": info["cuda"],
            "devices": [d["name"] + ": " + d["description"] for d in info["devices"]]}


def git_commit() -> str:
    """The commit measured: PYTURBO_COMMIT when set (a copied tree without .git, like the GPU machine's), else the
    checkout this runs in (the current directory, then the package's own)."""
    if settings.read("PYTURBO_COMMIT"):
        return settings.read("PYTURBO_COMMIT")
    for where in (Path.cwd(), Path(__file__).parent):
        try:
            out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                 cwd=where, timeout=5).stdout.strip()
        except Exception:
            continue
        if out:
            return out
    return "unknown"

"""The table and the results file of bench/server_reference.py (statistics over rounds, the markdown, the machine and
commit it was measured on), apart from the servers and the client that measure."""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import os
import platform
import shlex
import statistics
import subprocess
from pathlib import Path

import reference_build  # bench/reference_build.py, beside this file

ROOT = reference_build.ROOT


# ---- statistics and the table ----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class RowSpec:
    key: str           # key of the measurement in a round's results
    label: str
    unit: str          # "tok/s" (higher is better) or "s" (lower is better)


def row_specs(users: list[int], lengths: list[int], streams: int) -> list[RowSpec]:
    rows = [RowSpec(f"decode/{u}", f"{u} user{'s' if u > 1 else ''} decoding at once, aggregate", "tok/s")
            for u in users]
    rows += [RowSpec(f"ttft/{n}", f"TTFT of a {n}-token prompt alone", "s") for n in lengths]
    for n in lengths:
        rows += [RowSpec(f"load/{n}/ttft", f"a {n}-token prompt while {streams} users stream: its TTFT", "s"),
                 RowSpec(f"load/{n}/gap", "... worst gap between two tokens of a streaming user meanwhile", "s"),
                 RowSpec(f"load/{n}/gap_before", "... the streams' median gap before it arrived", "s")]
    return rows


def spread(values: list[float], unit: str) -> str:
    """'median (min-max)' of a row's values over rounds; '-' when there are none."""
    if not values:
        return "-"
    fmt = "{:.1f}" if unit == "tok/s" else "{:.3f}"
    med = fmt.format(statistics.median(values))
    if len(values) == 1:
        return med
    return f"{med} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def ratio_cell(pyturbo: list[float], llama: list[float]) -> str:
    """pyturbo / llama-server of the medians, with the min-max of the per-round ratios (rounds are paired)."""
    if not pyturbo or not llama:
        return "-"
    med_l = statistics.median(llama)
    if med_l == 0:
        return "-"
    text = f"{statistics.median(pyturbo) / med_l:.2f}x"
    pairs = [p / q for p, q in zip(pyturbo, llama) if q]
    if len(pairs) > 1:
        text += f" ({min(pairs):.2f}-{max(pairs):.2f})"
    return text


def table(rows: list[RowSpec], results: dict[str, list[dict]]) -> str:
    """The markdown table; results[server] is the list of rounds, each {row key: value}."""
    def values(server, key):
        return [r[key] for r in results.get(server, []) if r.get(key) is not None]

    out = ["| | unit | llama-server | pyturbo.server | pyturbo / llama-server |", "|---|---|---|---|---|"]
    for spec in rows:
        better = "higher is better" if spec.unit == "tok/s" else "lower is better"
        lv, pv = values("llama-server", spec.key), values("pyturbo", spec.key)
        out.append(f"| {spec.label} | {spec.unit} ({better}) | {spread(lv, spec.unit)} | {spread(pv, spec.unit)} | "
                   f"{ratio_cell(pv, lv)} |")
    return "\n".join(out)


def aggregate_tps(users: list[list[float]]) -> float:
    """Decode throughput of users streaming at once: every token after the first of all / (the last token of any
    user - the first token of any user). users[i] is user i's token arrival times."""
    times = [t for u in users for t in u]
    if len(times) < 2:
        return float("nan")
    window = max(times) - min(times)
    return (len(times) - 1) / window if window > 0 else float("nan")


def gaps_in_flight(tokens: list[float], t_sent: float, t_first: float) -> list[float]:
    """The gaps between consecutive tokens of one stream that overlap [t_sent, t_first] (the other prompt in flight):
    the one running when it was sent, every one during its prefill, and the one running when its first token came."""
    return [b - a for a, b in zip(tokens, tokens[1:]) if b > t_sent and a < t_first]


def gaps_before(tokens: list[float], t_sent: float) -> list[float]:
    return [b - a for a, b in zip(tokens, tokens[1:]) if b <= t_sent]


# ---- the report ------------------------------------------------------------------------------------------------------

def machine() -> str:
    cpu = platform.processor() or "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    mem = ""
    with contextlib.suppress(OSError, ValueError, IndexError):
        kb = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0])
        mem = f", {kb / 2**20:.0f} GiB memory"
    return (f"{os.cpu_count()} cores ({usable} usable), {cpu}{mem}, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}")


def git_commit() -> str:
    def git(*a):
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    commit = git("rev-parse", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return commit + (" (with uncommitted changes in the work tree)" if dirty else "")


def report(args, argv: list[str], results: dict, commands: dict, notes: list[str], started: str,
           load: tuple[list[float], list[float]], elapsed: float, short_prompt: int) -> str:
    rows = row_specs(args.users, args.lengths, args.streams)
    pin = reference_build._pin()
    parts = [
        f"# pyturbo.server vs stock llama-server — {started}{' (--quick)' if args.quick else ''}", "",
        f"Command: `{shlex.join(['python', 'bench/server_reference.py', *argv])}`", "",
        f"- Machine: {machine()}; load average at the start {', '.join(f'{x:.2f}' for x in load[0])}, at the end "
        f"{', '.join(f'{x:.2f}' for x in load[1])}",
        f"- pyturbo commit: {git_commit()}",
        f"- llama-server and rpc-server: stock llama.cpp {pin['commit']} as shipped in {pin['sdist_name']} "
        f"{pin['sdist_version']} (unpatched, CPU + RPC, Release; bench/reference_build.py)",
        f"- Model: {args.model_desc}",
        f"- Layout: {args.workers} RPC workers x {args.worker_threads} thread(s) on 127.0.0.1 per server, layers split "
        f"evenly, all on the workers; server process threads {args.server_threads}; {args.parallel} slots, context "
        f"{args.ctx} tokens per slot (llama-server: -c {args.ctx * args.parallel} over -np {args.parallel}); "
        f"n_batch {args.n_batch}, n_ubatch {args.n_ubatch}",
        f"- Requests: POST /v1/completions, streamed, greedy, token-id prompts (decoding users {short_prompt} tokens, "
        f"{args.max_tokens} tokens each; the long prompt 1 token), a new prompt for every request; EOS ignored "
        f"(`ignore_eos` where the server honours it, else logit_bias -100) and non-text tokens biased away so that "
        f"every token is one event; rounds: {args.repeat}, each server once per round in alternating order, each "
        f"started afresh with one untimed warm-up request (a prompt of one ubatch, 8 tokens); total time {elapsed / 60:.1f} min",
        "- Rows: decode aggregate = all tokens but the first / (last token of any user - first token of any user); "
        "TTFT = client time from sending to the first token; worst gap = the longest time between two tokens of a "
        "streaming user among the gaps that overlap the long prompt's time in flight (sent to first token). Cells: "
        "median (min-max) over rounds; the ratio is pyturbo / llama-server of the medians (min-max of the per-round "
        "ratios).", "",
        table(rows, results), ""]
    if notes:
        parts += ["Notes:", "", *[f"- {n}" for n in notes], ""]
    parts += ["Server command lines (first round; ports and worker addresses change per round):", ""]
    for name, cmd in commands.items():
        parts += [f"- {name}: `{cmd}`"]
    parts += ["", "Raw numbers (per server and round; times in seconds, tps in tokens/s, server_prompt_ms the "
                  "server's own prefill time, stream_tokens the streaming users' tokens when they were stopped):", "",
              "```text", *raw_lines(results), "```", ""]
    return "\n".join(parts)


def _rounded(x):
    if isinstance(x, float):
        return None if x != x else round(x, 4)
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_rounded(v) for v in x]
    return x


def raw_lines(results: dict[str, list[dict]]) -> list[str]:
    """One line per server, round and row: the row's raw measurement as compact JSON."""
    lines = []
    for name, rounds in results.items():
        for i, rnd in enumerate(rounds):
            lines.append(f"{name} round {i + 1}: ignore_eos honoured: {rnd.get('ignore_eos')}")
            for key, value in rnd.get("raw", {}).items():
                lines.append(f"{name} round {i + 1} {key}: {json.dumps(_rounded(value), separators=(', ', ': '))}")
    return lines


def default_out(quick: bool) -> Path:
    return ROOT / "bench" / "results" / f"{dt.date.today().isoformat()}-server-reference{'-quick' if quick else ''}.md"

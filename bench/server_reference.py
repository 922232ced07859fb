"""pyturbo's server against stock llama-server on the same model and the same kind of workers (issue 23's table).

    python bench/server_reference.py            # the full table (several minutes on 2 cores, after the build)
    python bench/server_reference.py --quick    # a smoke run: small prompts, 1 and 4 users, one round (< 1 min)

What it does:
1. builds stock llama-server and its RPC server from the pinned llama.cpp (bench/reference_build.py: the source from
   the same sdist as the package build, via vendor/llama.cpp/fetch.py, unpatched; build/reference/, reused; the first
   build takes a few minutes on 2 cores);
2. writes the bench model once (pyturbo.synth: 8 layers, 1024 wide, F16, the tiny real vocabulary, random weights;
   cached in ~/.cache/pyturbo);
3. per round, for each server in turn (the order alternates between rounds; one server at a time): starts --workers
   RPC workers on 127.0.0.1 (stock `rpc-server` for llama-server, `python -m pyturbo.worker` for pyturbo, --worker-threads
   each), then the server on a free 127.0.0.1 port with the same settings (--parallel slots, --ctx per slot, n_batch,
   n_ubatch, the layers split evenly, all layers on the workers, --server-threads), one untimed warm-up request, the
   measurements, and everything stopped (bounded waits, then kill; children also die with this process);
4. measures through the OpenAI route POST /v1/completions with "stream": true, greedy, token-id prompts that differ
   per request (no prompt-cache hit), EOS ignored (`ignore_eos` where a probe shows the server honours it, else a
   logit_bias against EOS) and the tokenizer's non-text tokens (byte, control, unknown) biased away, so that every
   request yields exactly max_tokens tokens and each token is one streamed event:
   - decode: U users at once (--users), each a short prompt and --max-tokens tokens; aggregate tok/s = all tokens
     but the first / (last token of any user - first token of any user);
   - TTFT alone: a prompt of each --lengths, alone (client time from sending to the first token);
   - under load: --streams users streaming (each past its first tokens), then a prompt of each --lengths arrives:
     its TTFT, and the worst gap between two tokens of a streaming user over the gaps that overlap that prompt's time
     in flight (sent to first token); also the streams' median gap before it arrived;
5. prints the table (medians with min-max over rounds, the ratio pyturbo / llama-server of the medians with the
   min-max of the per-round ratios) and writes it with the raw numbers, the command lines, the machine and the git
   commit to bench/results/<date>-server-reference.md (--quick: ...-server-reference-quick.md; --out overrides).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
import os
import re
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reference_build  # noqa: E402  (bench/reference_build.py, beside this file)
from server_reference_report import (RowSpec, aggregate_tps, default_out, gaps_before, gaps_in_flight,  # noqa: E402,F401
                                     ratio_cell, report, row_specs, spread, table)

ROOT = reference_build.ROOT
SERVERS = ("llama-server", "pyturbo")
QUICK = {"users": [1, 4], "lengths": [256, 1024], "repeat": 1, "max_tokens": 32, "ctx": 2048}
FULL = {"users": [1, 4, 8], "lengths": [1500, 6000], "repeat": 3, "max_tokens": 128, "ctx": 8192}
SHORT_PROMPT = 16          # tokens of a decoding user's prompt
WARM_TOKENS = 8            # tokens each stream must have before the long prompt is sent
REQUEST_TIMEOUT = 900.0    # seconds: the longest any one request may take
START_TIMEOUT = 300.0      # seconds for a server to load and answer /health
IDLE_TIMEOUT = 60.0        # seconds for a server to drop cancelled streams


# ---- arguments -------------------------------------------------------------------------------------------------------

def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, not {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, not {text!r}")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from pyturbo.server.settings import DEFAULTS
    ap = argparse.ArgumentParser(prog="python bench/server_reference.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help=f"smoke run: users {QUICK['users']}, prompts {QUICK['lengths']}, {QUICK['repeat']} round, "
                         f"{QUICK['max_tokens']} tokens per user, ctx {QUICK['ctx']} (each overridable)")
    ap.add_argument("--users", type=_ints, help=f"concurrent decoding users per row (default {FULL['users']})")
    ap.add_argument("--lengths", type=_ints, help=f"long-prompt lengths in tokens (default {FULL['lengths']})")
    ap.add_argument("--repeat", type=int, help=f"rounds, each server once per round (default {FULL['repeat']})")
    ap.add_argument("--max-tokens", type=int, help=f"tokens per decoding user (default {FULL['max_tokens']})")
    ap.add_argument("--ctx", type=int, help=f"context tokens per slot (default {FULL['ctx']}); llama-server gets "
                                            f"-c ctx x parallel")
    ap.add_argument("--parallel", type=int, default=4, help="slots of each server (default 4)")
    ap.add_argument("--streams", type=int, default=3, help="users streaming while a long prompt arrives (default 3)")
    ap.add_argument("--n-batch", type=int, default=DEFAULTS["n_batch"],
                    help=f"n_batch of both servers (default pyturbo's, {DEFAULTS['n_batch']})")
    ap.add_argument("--n-ubatch", type=int, default=DEFAULTS["n_ubatch"],
                    help=f"n_ubatch of both servers (default pyturbo's, {DEFAULTS['n_ubatch']})")
    ap.add_argument("--workers", type=int, default=4, help="RPC workers per server (default 4)")
    ap.add_argument("--worker-threads", type=int, default=1, help="threads per worker (default 1)")
    ap.add_argument("--server-threads", type=int, default=1, help="CPU threads of each server process (default 1)")
    ap.add_argument("--servers", default=",".join(SERVERS),
                    help="which servers to measure, comma-separated (default both; the ratio needs both)")
    ap.add_argument("--model", type=Path, help="a GGUF with a tokenizer vocabulary instead of the bench model")
    ap.add_argument("--out", type=Path, help="the results file (default bench/results/<date>-server-reference.md)")
    ap.add_argument("--log-dir", type=Path, help="keep the servers' and workers' logs here (default: a temp dir)")
    ap.add_argument("--jobs", type=int, help="compile jobs for the llama.cpp build (default: all cores)")
    args = ap.parse_args(argv)
    base = QUICK if args.quick else FULL
    for key, value in base.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    if not args.servers or set(args.servers) - set(SERVERS):
        ap.error(f"--servers takes {', '.join(SERVERS)}, not {args.servers}")
    for name in ("repeat", "max_tokens", "ctx", "parallel", "n_batch", "n_ubatch", "workers", "worker_threads",
                 "server_threads"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.streams < 1:
        ap.error("--streams must be >= 1")
    if args.parallel < args.streams + 1:
        ap.error(f"--parallel ({args.parallel}) must leave a slot for the long prompt beside --streams "
                 f"({args.streams})")
    if args.n_ubatch > args.n_batch:
        ap.error(f"--n-ubatch ({args.n_ubatch}) must not exceed --n-batch ({args.n_batch})")
    need = max(max(args.lengths) + 2, SHORT_PROMPT + args.max_tokens + 1, SHORT_PROMPT + WARM_TOKENS + 64)
    if args.ctx < need:
        ap.error(f"--ctx ({args.ctx}) must hold the longest prompt and a user's tokens: at least {need}")
    return args


# ---- the model and its tokens ----------------------------------------------------------------------------------------

def bench_model() -> Path:
    """The server bench model: bench-8l's shape (8 layers, 1024 wide, F16) with the tiny real vocabulary and its
    chat template, written once to the pyturbo cache (as the demo's model is, pyturbo.server.demo)."""
    from pyturbo.tools import synth
    shape = dataclasses.replace(synth.PRESETS["bench-8l"], n_vocab=synth.tiny_vocab_size())
    return synth.cached_model(shape, vocab="tiny", chat_template=synth.TINY_CHAT_TEMPLATE, progress=True)


@dataclasses.dataclass
class Vocab:
    n_layer: int
    eos: int
    text_tokens: list[int]     # NORMAL tokens: prompts are drawn from these
    non_text: list[int]        # byte, control, unknown, unused tokens other than EOS: biased away

    @classmethod
    def of(cls, path: Path) -> "Vocab":
        import gguf
        reader = gguf.GGUFReader(str(path))

        def field(name):
            f = reader.fields.get(name)
            if f is None:
                return None
            return [f.parts[i][0] if len(f.parts[i]) == 1 else bytes(f.parts[i]) for i in f.data]

        types = field("tokenizer.ggml.token_type")
        if not types:
            raise SystemExit(f"{path} has no tokenizer vocabulary: the servers need one to stream text")
        arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
        eos = int(field("tokenizer.ggml.eos_token_id")[0])
        normal = [i for i, t in enumerate(types) if int(t) == 1]
        other = [i for i, t in enumerate(types) if int(t) != 1 and i != eos]
        return cls(n_layer=int(field(f"{arch}.block_count")[0]), eos=eos, text_tokens=normal, non_text=other)

    def prompt(self, n: int, *seed) -> list[int]:
        """n token ids of normal text tokens, different for every seed (so no request hits a prompt cache)."""
        import numpy as np
        rng = np.random.default_rng(zlib.crc32(repr(seed).encode()))
        return [self.text_tokens[i] for i in rng.integers(0, len(self.text_tokens), n)]


# ---- processes -------------------------------------------------------------------------------------------------------

def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when this process ends, however it ends (Linux's PR_SET_PDEATHSIG)."""
    with contextlib.suppress(Exception):
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(cmd: list, log_path: Path, env: dict | None = None) -> subprocess.Popen:
    with open(log_path, "ab") as log:
        log.write(("$ " + shlex.join(map(str, cmd)) + "\n").encode())
        log.flush()
        return subprocess.Popen([str(c) for c in cmd], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=dict(os.environ, **(env or {})), preexec_fn=_die_with_parent)


def stop(procs: list[subprocess.Popen], timeout: float = 10.0) -> None:
    """Terminate, wait a bounded time, kill what is left."""
    alive = [p for p in procs if p.poll() is None]
    for p in alive:
        with contextlib.suppress(ProcessLookupError):
            p.terminate()
    deadline = time.monotonic() + timeout
    for p in alive:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=10)


def wait_listening(port: int, proc: subprocess.Popen, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.1)
    raise TimeoutError(f"{what} did not listen on 127.0.0.1:{port} within {timeout:.0f} s")


def has_flag(helptext: str, flag: str) -> bool:
    """Whether llama-server's --help lists `flag` itself (not merely a longer flag that starts with it)."""
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", helptext) is not None


def llama_server_flags(binary: Path) -> str:
    """llama-server's --help text, to use only the flags this build has."""
    res = subprocess.run([str(binary), "--help"], capture_output=True, text=True, timeout=60)
    return res.stdout + res.stderr


@contextlib.contextmanager
def running_server(name: str, args, model: Path, vocab: Vocab, bins: dict | None, log_dir: Path):
    """Workers and the server `name` on 127.0.0.1; yields (base URL, the server's command line). Everything is
    stopped when the block ends."""
    from pyturbo.model import even_layer_split
    from pyturbo.server import launch
    from pyturbo.tools import workers as pyturbo_workers
    split = ",".join(f"{x:.6g}" for x in even_layer_split(vocab.n_layer, args.workers))
    procs: list[subprocess.Popen] = []
    pool = None
    port = free_port()
    try:
        if name == "llama-server":
            endpoints = []
            for i in range(args.workers):
                wport = free_port()
                procs.append(spawn([bins["rpc"], "-H", "127.0.0.1", "-p", wport, "-t", args.worker_threads],
                                   log_dir / f"llama-rpc{i}.log"))
                endpoints.append(f"127.0.0.1:{wport}")
            for p, ep in zip(procs, endpoints):
                wait_listening(int(ep.rpartition(":")[2]), p, 60, f"rpc-server {ep}")
            helptext = llama_server_flags(bins["server"])
            cmd = [bins["server"], "-m", model, "--host", "127.0.0.1", "--port", port, "--rpc", ",".join(endpoints),
                   "-ngl", "99", "-sm", "layer", "-ts", split, "-c", args.ctx * args.parallel, "-np", args.parallel,
                   "-b", args.n_batch, "-ub", args.n_ubatch, "-t", args.server_threads, "-tb", args.server_threads,
                   "-cb"]
            # each slot its own --ctx cells (llama-server's default with -np: -c split over the slots, as pyturbo's
            # server does), no web UI, no automatic fitting (the sizes are given)
            cmd += ["--no-kv-unified"] if has_flag(helptext, "--no-kv-unified") else []
            cmd += ["--no-webui"] if has_flag(helptext, "--no-webui") else []
            cmd += ["--fit", "off"] if has_flag(helptext, "--fit") else []
        else:
            pool = pyturbo_workers.WorkerPool(args.workers, threads=args.worker_threads, log_dir=log_dir)
            cmd = [sys.executable, "-m", "pyturbo.server", "--model", model, "--host", "127.0.0.1", "--port", port,
                   "--rpc", ",".join(pool.endpoints), "--tensor-split", split, "--n-ctx", args.ctx,
                   "--parallel", args.parallel, "--n-batch", args.n_batch, "--n-ubatch", args.n_ubatch,
                   "--threads", args.server_threads]
        log_path = log_dir / f"{name}.log"
        server = spawn(cmd, log_path, env={"PYTHONUNBUFFERED": "1"})
        procs.append(server)
        url = f"http://127.0.0.1:{port}"
        launch.wait_healthy(url, server, START_TIMEOUT, log_path)
        shown = [str(c) for c in cmd]
        yield url, shlex.join(shown)
    finally:
        stop(procs[::-1])
        if pool is not None:
            pool.stop()


# ---- the client ------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Stream:
    """One streamed completion as the client saw it."""
    t_sent: float = 0.0
    tokens: list[float] = dataclasses.field(default_factory=list)   # arrival time of each token event
    finish_reason: str | None = None
    timings: dict = dataclasses.field(default_factory=dict)
    error: str | None = None
    done: bool = False

    @property
    def ttft(self) -> float:
        return self.tokens[0] - self.t_sent if self.tokens else float("nan")


class Client:
    """Streamed /v1/completions requests to one server, greedy, EOS ignored, non-text tokens biased away."""

    def __init__(self, http, url: str, vocab: Vocab, ignore_eos: bool):
        self.http, self.url, self.vocab, self.ignore_eos = http, url, vocab, ignore_eos

    def body(self, prompt: list[int], max_tokens: int) -> dict:
        bias = {str(t): -100 for t in self.vocab.non_text}
        if not self.ignore_eos:
            bias[str(self.vocab.eos)] = -100
        body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True, "logit_bias": bias}
        if self.ignore_eos:
            body["ignore_eos"] = True
        return body

    async def stream(self, prompt: list[int], max_tokens: int, out: Stream, progress: asyncio.Event | None = None):
        """Fill `out` as the events come; a token event is one whose choice has text. Cancelling closes the
        connection (both servers then stop that generation)."""
        out.t_sent = time.perf_counter()
        try:
            async with self.http.stream("POST", self.url + "/v1/completions",
                                        json=self.body(prompt, max_tokens)) as r:
                if r.status_code != 200:
                    out.error = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:300]}"
                    return out
                async for line in r.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    now = time.perf_counter()
                    event = json.loads(data)
                    if "error" in event:
                        out.error = json.dumps(event["error"])[:300]
                        break
                    choices = event.get("choices") or []
                    if choices and choices[0].get("text"):
                        out.tokens.append(now)
                        if progress is not None:
                            progress.set()
                    if choices and choices[0].get("finish_reason"):
                        out.finish_reason = choices[0]["finish_reason"]
                    if event.get("timings"):
                        out.timings = event["timings"]
        finally:
            out.done = True
        return out

    async def once(self, prompt: list[int], max_tokens: int) -> Stream:
        return await asyncio.wait_for(self.stream(prompt, max_tokens, Stream()), REQUEST_TIMEOUT)


async def probe_ignore_eos(http, url: str, vocab: Vocab) -> bool:
    """Does the server honour ignore_eos? Ask for 4 tokens with EOS pushed to the top: a server that ignores the field
    stops at the first token."""
    body = {"prompt": vocab.prompt(8, "probe"), "max_tokens": 4, "temperature": 0, "stream": False,
            "ignore_eos": True, "logit_bias": {str(vocab.eos): 100}}
    r = await http.post(url + "/v1/completions", json=body)
    r.raise_for_status()
    return r.json().get("usage", {}).get("completion_tokens", 0) >= 4


async def wait_idle(http, url: str, timeout: float = IDLE_TIMEOUT) -> None:
    """Until the server has dropped every generation (cancelled streams included): pyturbo's /health counts free
    slots, llama-server's /slots says which are processing. Bounded; a server without either gets a second."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            health = (await http.get(url + "/health")).json()
            if "slots_free" in health:
                if health["slots_free"] == health.get("slots") and not health.get("queue"):
                    return
            else:
                r = await http.get(url + "/slots")
                if r.status_code != 200:
                    await asyncio.sleep(1.0)
                    return
                if not any(s.get("is_processing") for s in r.json()):
                    return
        except Exception:
            await asyncio.sleep(1.0)
            return
        await asyncio.sleep(0.1)
    raise TimeoutError(f"{url} was still busy {timeout:.0f} s after the last request")


async def measure_decode(client: Client, users: int, max_tokens: int, seed) -> dict:
    streams = [Stream() for _ in range(users)]
    await asyncio.wait_for(asyncio.gather(*(client.stream(client.vocab.prompt(SHORT_PROMPT, *seed, i), max_tokens, s)
                                            for i, s in enumerate(streams))), REQUEST_TIMEOUT)
    errors = [s.error for s in streams if s.error]
    if errors:
        raise RuntimeError(f"decode with {users} users: {errors[0]}")
    return {"tps": aggregate_tps([s.tokens for s in streams]), "tokens": [len(s.tokens) for s in streams],
            "per_user_tps": [(len(s.tokens) - 1) / (s.tokens[-1] - s.tokens[0]) if len(s.tokens) > 1 else None
                             for s in streams]}


async def measure_alone(client: Client, n: int, seed) -> dict:
    s = await client.once(client.vocab.prompt(n, *seed), 1)
    if s.error or not s.tokens:
        raise RuntimeError(f"a {n}-token prompt: {s.error or 'no token came'}")
    return {"ttft": s.ttft, "server_prompt_ms": s.timings.get("prompt_ms")}


async def measure_under_load(client: Client, n: int, n_streams: int, stream_tokens: int, seed) -> dict:
    """n_streams users streaming, then a prompt of n tokens: its TTFT and the streams' gaps while it is in flight."""
    streams = [Stream() for _ in range(n_streams)]
    tick = asyncio.Event()
    tasks = [asyncio.create_task(client.stream(client.vocab.prompt(SHORT_PROMPT, *seed, "stream", i), stream_tokens,
                                               s, tick)) for i, s in enumerate(streams)]

    async def until(cond, timeout, what):
        deadline = time.monotonic() + timeout
        while not cond():
            if any(s.error for s in streams):
                raise RuntimeError(f"a streaming user failed: {next(s.error for s in streams if s.error)}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} within {timeout:.0f} s")
            tick.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(tick.wait(), 0.5)

    try:
        await until(lambda: all(len(s.tokens) >= WARM_TOKENS for s in streams), REQUEST_TIMEOUT,
                    f"the {n_streams} streams did not all reach {WARM_TOKENS} tokens")
        long = await client.once(client.vocab.prompt(n, *seed, "long"), 1)
        if long.error or not long.tokens:
            raise RuntimeError(f"a {n}-token prompt under load: {long.error or 'no token came'}")
        t_sent, t_first = long.t_sent, long.tokens[0]
        # the gap that runs when the long prompt's first token comes ends with the stream's next token
        await until(lambda: all(s.done or (s.tokens and s.tokens[-1] > t_first) for s in streams), REQUEST_TIMEOUT,
                    "the streams did not go on after the long prompt")
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    in_flight = [g for s in streams for g in gaps_in_flight(s.tokens, t_sent, t_first)]
    before = [g for s in streams for g in gaps_before(s.tokens, t_sent)]
    ended_early = sum(1 for s in streams if not (s.tokens and s.tokens[-1] > t_first))
    return {"ttft": t_first - t_sent, "gap": max(in_flight) if in_flight else None,
            "gap_before": statistics.median(before) if before else None, "server_prompt_ms":
            long.timings.get("prompt_ms"), "streams_ended_early": ended_early,
            "stream_tokens": [len(s.tokens) for s in streams]}


async def measure_server(url: str, args, vocab: Vocab, rnd: int, log=print) -> dict:
    """One round of every row against the server at url: {row key: value}, plus "raw" and "ignore_eos"."""
    import httpx
    timeout = httpx.Timeout(REQUEST_TIMEOUT, connect=10.0)
    async with httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=64)) as http:
        ignore_eos = await probe_ignore_eos(http, url, vocab)
        client = Client(http, url, vocab, ignore_eos)
        # first-request costs, untimed: one full ubatch of prompt and a few tokens
        await client.once(vocab.prompt(min(args.n_ubatch, args.ctx // 2), "warm-up", rnd), 8)
        await wait_idle(http, url)
        out: dict = {"ignore_eos": ignore_eos, "raw": {}}
        for u in args.users:
            r = await measure_decode(client, u, args.max_tokens, ("decode", rnd, u))
            out[f"decode/{u}"], out["raw"][f"decode/{u}"] = r["tps"], r
            bad = [k for k in r["tokens"] if k != args.max_tokens]
            log(f"  {u} users: {r['tps']:.1f} tok/s aggregate" +
                (f" (WARNING: token counts {r['tokens']}, not {args.max_tokens} each)" if bad else ""))
            await wait_idle(http, url)
        for n in args.lengths:
            r = await measure_alone(client, n, ("alone", rnd, n))
            out[f"ttft/{n}"], out["raw"][f"ttft/{n}"] = r["ttft"], r
            log(f"  {n} tokens alone: TTFT {r['ttft']:.3f} s")
            await wait_idle(http, url)
        stream_tokens = args.ctx - SHORT_PROMPT - 8
        for n in args.lengths:
            r = await measure_under_load(client, n, args.streams, stream_tokens, ("load", rnd, n))
            await wait_idle(http, url)
            out[f"load/{n}/ttft"], out[f"load/{n}/gap"], out[f"load/{n}/gap_before"] = r["ttft"], r["gap"], \
                r["gap_before"]
            out["raw"][f"load/{n}"] = r
            log(f"  {n} tokens while {args.streams} stream: TTFT {r['ttft']:.3f} s, worst gap "
                f"{r['gap'] if r['gap'] is None else round(r['gap'], 3)} s (median gap before "
                f"{r['gap_before'] if r['gap_before'] is None else round(r['gap_before'], 3)} s)" +
                (f" WARNING: {r['streams_ended_early']} stream(s) ended before it" if r["streams_ended_early"] else ""))
        return out


# ---- main ------------------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    t_start, load_start = time.monotonic(), os.getloadavg()
    started = dt.date.today().isoformat()
    bins = reference_build.build(args.jobs) if "llama-server" in args.servers else None
    model = args.model or bench_model()
    vocab = Vocab.of(model)
    args.model_desc = (f"{model.name}" if args.model else
                       "the bench model (pyturbo.synth bench-8l shape: 8 layers, 1024 wide, n_ff 2816, 16 heads, 4 KV "
                       f"heads, F16, random weights) with the tiny real vocabulary ({len(vocab.text_tokens)} text "
                       f"tokens), `{model.name}`")
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="pyturbo-server-reference-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    print(f"logs: {log_dir}", file=sys.stderr, flush=True)
    results: dict[str, list[dict]] = {s: [] for s in args.servers}
    commands: dict[str, str] = {}
    notes: list[str] = []
    for rnd in range(args.repeat):
        order = args.servers if rnd % 2 == 0 else args.servers[::-1]
        for name in order:
            print(f"round {rnd + 1}/{args.repeat}: {name}", file=sys.stderr, flush=True)
            with running_server(name, args, model, vocab, bins, log_dir) as (url, cmd):
                commands.setdefault(name, cmd)
                out = asyncio.run(measure_server(url, args, vocab, rnd,
                                                 log=lambda m: print(m, file=sys.stderr, flush=True)))
            if not out["ignore_eos"]:
                note = f"{name} did not honour ignore_eos (a probe): EOS was kept away with logit_bias -100 instead"
                if note not in notes:
                    notes.append(note)
            results[name].append(out)
    rows = row_specs(args.users, args.lengths, args.streams)
    text = report(args, argv, results, commands, notes, started, (list(load_start), list(os.getloadavg())),
                  time.monotonic() - t_start, SHORT_PROMPT)
    print(table(rows, results))
    out_path = args.out or default_out(args.quick)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_suffix(out_path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(out_path)
    print(f"written: {out_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    # a SIGTERM (or the terminal's SIGHUP) ends the run through the finally blocks: every child is stopped (and the
    # children also get SIGTERM if this process dies without them: PR_SET_PDEATHSIG, --exit-with-parent)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, _frame: sys.exit(128 + signum))
    sys.exit(main())

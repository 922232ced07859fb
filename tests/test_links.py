"""The shaped-link harness (pyturbo.tools.links): it comes up and goes down leaving nothing, removes
what a killed run left, prefills behind it equal prefills over loopback bit for bit, the shaping really limits, the
coordinator's byte counters see what crosses its link and only that. Needs root and iproute2 (skipped otherwise);
everything listens on addresses inside the namespaces the test made."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from pyturbo import Model, WorkerError
from pyturbo.rpc_auth import RPC_TOKEN_ENV
from pyturbo.tools import links
from pyturbo.tools.bench import parse_args
from conftest import prompt

needs_links = pytest.mark.skipif(not links.available(), reason=f"shaped links: {links.unavailable_reason()}")

# A one-connection TCP peer run inside a namespace. serve HOST MODE N: prints its port, then with MODE "sink" reads
# N bytes and answers one byte, with "source" sends N bytes; connect HOST PORT MODE N: the other side of it, prints
# the seconds it took. Bounded: the socket times out after 60 s.
PEER = textwrap.dedent("""
    import socket, sys, time
    def recv_n(c, n):
        got = 0
        while got < n:
            b = c.recv(min(1 << 16, n - got))
            if not b:
                raise SystemExit(f"peer closed after {got} of {n} bytes")
            got += len(b)
    role, host = sys.argv[1], sys.argv[2]
    if role == "serve":
        mode, n = sys.argv[3], int(sys.argv[4])
        s = socket.socket(); s.settimeout(60); s.bind((host, 0)); s.listen(1)
        print(s.getsockname()[1], flush=True)
        c, _ = s.accept(); c.settimeout(60)
        if mode == "sink":
            recv_n(c, n); c.sendall(b"x")
        else:
            c.sendall(b"\\0" * n); c.shutdown(socket.SHUT_WR); c.recv(1)
        c.close()
    else:
        port, mode, n = int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
        c = socket.create_connection((host, port), timeout=60)
        t = time.monotonic()
        if mode == "sink":
            c.sendall(b"\\0" * n); recv_n(c, 1)
        else:
            recv_n(c, n)
        print(time.monotonic() - t, flush=True)
        c.close()
""")

RATE = 20                        # Mbit/s
SIZE = 3 << 20                   # bytes: 1.26 s at 20 Mbit/s
FLOOR = 0.8 * SIZE * 8 / (RATE * 1e6)


def serve(net: links.Links, i: int, mode: str) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([*net.exec_prefix(i), sys.executable, "-c", PEER, "serve", net.worker_addresses[i], mode,
                             str(SIZE)], stdout=subprocess.PIPE, text=True)
    return proc, int(proc.stdout.readline())


def transfer_from_coordinator(net: links.Links, i: int, mode: str) -> float:
    """Seconds to move SIZE bytes between this process and worker namespace i (mode "sink": to it; "source": from
    it), from the connection to the last byte."""
    proc, port = serve(net, i, mode)
    try:
        with socket.create_connection((net.worker_addresses[i], port), timeout=60) as c:
            c.settimeout(60)
            t = time.monotonic()
            if mode == "sink":
                c.sendall(b"\0" * SIZE)
                assert c.recv(1) == b"x"
            else:
                got = 0
                while got < SIZE:
                    b = c.recv(1 << 16)
                    assert b, f"closed after {got} bytes"
                    got += len(b)
                c.sendall(b"x")
            return time.monotonic() - t
    finally:
        proc.wait(timeout=30)


def transfer_between_workers(net: links.Links, src: int, dst: int) -> float:
    """Seconds to move SIZE bytes from worker namespace src to worker namespace dst."""
    proc, port = serve(net, dst, "sink")
    try:
        out = subprocess.run([*net.exec_prefix(src), sys.executable, "-c", PEER, "connect", net.worker_addresses[dst],
                              str(port), "sink", str(SIZE)], capture_output=True, text=True, timeout=90)
        assert out.returncode == 0, out.stderr
        return float(out.stdout)
    finally:
        proc.wait(timeout=30)


def leftovers(tag: str) -> list[str]:
    spaces = [p.name for p in Path("/run/netns").iterdir()] if Path("/run/netns").is_dir() else []
    return [n for n in spaces + os.listdir("/sys/class/net") if n.startswith(f"{links.PREFIX}{tag}")]


@needs_links
def test_up_and_down_leaves_nothing():
    delay = 0 if links.delay_unavailable_reason() else 1     # netem, where the kernel has it
    with links.Links(2, rate=50, model="per-worker", delay_ms=delay) as net:
        tag = net.tag
        assert sorted(leftovers(tag)) == sorted([net.interface, net.switch_ns, *net.worker_ns])
        assert all(len(name) <= 15 for name in [net.interface, "br0", "c", "w0", "eth0"])
        assert [e.rpartition(":")[0] for e in net.endpoints] == net.worker_addresses
        pids = [p.pid for p in net.pool.procs]
    assert leftovers(tag) == []
    assert all(not Path(f"/proc/{pid}").exists() or b"pyturbo.worker" not in Path(f"/proc/{pid}/cmdline").read_bytes()
               for pid in pids)


@needs_links
def test_teardown_when_the_block_fails():
    with pytest.raises(ZeroDivisionError):
        with links.Links(1, rate=None) as net:
            tag = net.tag
            1 / 0
    assert leftovers(tag) == []


@needs_links
def test_leftovers_of_a_killed_run_are_removed():
    # a process builds a harness with a worker, then dies without tearing anything down
    code = ("import os, sys; from pyturbo.tools import links; net = links.Links(1, rate=10); "
            "print(net.tag, flush=True); os.kill(os.getpid(), 9)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    tag = proc.stdout.split()[0]
    assert leftovers(tag)                       # it did leave them
    removed = links.cleanup_leftovers()
    assert set(removed) >= set(leftovers(tag)) | {f"{links.PREFIX}{tag}-s"}
    assert leftovers(tag) == []


@needs_links
@pytest.mark.parametrize("model", links.MODELS)
def test_shaping_limits_and_counters_see_the_bytes(model):
    with links.Links(2, rate=RATE, model=model, workers=False) as net:
        for mode in ("sink", "source"):       # coordinator -> worker 0, worker 0 -> coordinator
            before = net.coordinator_bytes()
            seconds = transfer_from_coordinator(net, 0, mode)
            moved = net.coordinator_bytes() - before
            assert seconds >= FLOOR, f"{model} {mode}: {SIZE} bytes in {seconds:.2f} s, faster than {RATE} Mbit/s"
            assert (moved.sent if mode == "sink" else moved.received) >= SIZE, moved
        # worker 1 -> worker 0 crosses the bridge, never the coordinator's link; shaped only on links per worker
        before = net.coordinator_bytes()
        seconds = transfer_between_workers(net, 1, 0)
        moved = net.coordinator_bytes() - before
        assert moved.total < SIZE // 100, f"worker-to-worker bytes crossed the coordinator's interface: {moved}"
        if model == "per-worker":
            assert seconds >= FLOOR, f"worker to worker: {SIZE} bytes in {seconds:.2f} s"


@needs_links
def test_set_rate_reshapes_the_live_links():
    """Links.set_rate: the same interfaces shaped at a rate, then not, then again (bench/shaped_links.py interleaves
    rates in the same processes this way)."""
    with links.Links(2, rate=None, model="per-worker", workers=False) as net:
        assert transfer_from_coordinator(net, 0, "sink") < FLOOR, "unshaped, yet as slow as the shaped link"
        net.set_rate(RATE)
        assert transfer_from_coordinator(net, 0, "sink") >= FLOOR
        net.set_rate(None)
        assert transfer_from_coordinator(net, 0, "sink") < FLOOR
        assert net.describe()["rate_mbit"] is None


@pytest.fixture(scope="module")
def loopback_logits(tiny_model, rpc3):
    """The reference: the same prefills over 3 workers on 127.0.0.1."""
    with Model(tiny_model, rpc_servers=rpc3.endpoints, tensor_split="even") as model:
        return {pipe: prefill(model, pipe)[0] for pipe in ("force", "off")}


N_TOKENS, N_UBATCH = 300, 64
# how activations go between workers: Context(rpc_transfers=...)
TRANSFERS = ("relay", "direct")


def prefill(model, pipe: str, net: links.Links | None = None, transfers: str | None = None):
    kwargs = {"rpc_transfers": transfers} if transfers else {}
    with model.context(n_ctx=512, n_batch=512, n_ubatch=N_UBATCH, **kwargs) as ctx:
        before = net.coordinator_bytes() if net else None
        res = ctx.prefill(prompt(N_TOKENS), pipeline=pipe)
        moved = net.coordinator_bytes() - before if net else None
        assert res.path == ("pipelined" if pipe == "force" else "standard"), res.fallback_reason
        return res.logits.copy(), res, moved


@needs_links
@pytest.mark.parametrize("model,rate", [("coordinator", 100), ("per-worker", 100), ("coordinator", None)])
def test_prefill_behind_links_equals_loopback(tiny_model, loopback_logits, model, rate):
    with links.Links(3, rate=rate, model=model) as net, \
            Model(tiny_model, rpc_servers=net.endpoints, tensor_split="even") as m:
        a, s = N_TOKENS * m.n_embd * 4, len(m.devices)      # the prompt's activations at one stage boundary
        for pipe, transfers in [("off", None)] + [("force", t) for t in TRANSFERS]:
            logits, res, moved = prefill(m, pipe, net, transfers)
            assert np.array_equal(logits, loopback_logits[pipe]), f"{pipe} {transfers} behind {net.shaping.describe()}"
            assert moved.sent >= a, moved          # at least the first stage's input
            if transfers != "direct":
                # relayed: each boundary activation comes back to the coordinator and goes out again
                assert moved.received >= (s - 1) * a and moved.sent >= s * a, moved


@needs_links
def test_direct_copies_skip_the_coordinator(tiny_model):
    """With direct copies the coordinator receives no activation: only the last stage's output (the logits)."""
    with links.Links(3, rate=None) as net, Model(tiny_model, rpc_servers=net.endpoints, tensor_split="even") as m:
        _, res, moved = prefill(m, "force", net, "direct")
        assert "through this process" not in res.transfers, res.transfers
        assert moved.received < N_TOKENS * m.n_embd * 4, moved


@needs_links
def test_workers_behind_links_with_a_secret(tiny_model, monkeypatch):
    monkeypatch.delenv(RPC_TOKEN_ENV, raising=False)
    with links.Links(2, rate=None, token="links-test-secret") as net:
        with pytest.raises(WorkerError):
            Model(tiny_model, rpc_servers=net.endpoints, rpc_token="")
        with Model(tiny_model, rpc_servers=net.endpoints, tensor_split="even", rpc_token=net.token) as m:
            assert len(prefill(m, "off")[0]) == m.n_vocab


@needs_links
def test_bad_arguments():
    with pytest.raises(ValueError, match="model must be one of"):
        links.Links(1, model="ring")
    with pytest.raises(ValueError, match="Mbit/s"):
        links.Links(1, rate=0)
    with pytest.raises(links.LinksError, match="overlaps"):
        links.Links(1, subnet="127.0.0.0/24", workers=False)


def bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pyturbo.bench", *args], capture_output=True, text=True, timeout=600)


@needs_links
def test_bench_behind_links(tmp_path):
    out = tmp_path / "bench"
    proc = bench("--preset", "tiny", "--workers", "3", "--threads", "1", "--lengths", "512", "--ubatch", "64",
                 "--repeat", "1", "--no-sweep", "--no-ceiling", "--link-rate", "100", "--link-model", "per-worker",
                 "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "behind links: 100 Mbit/s each way: a link per worker" in proc.stdout.splitlines()[0]
    assert "bytes through the coordinator's link per ubatch" in proc.stdout
    doc = json.loads((out / "results.json").read_text())
    assert doc["links"]["model"] == "per-worker" and doc["links"]["rate_mbit"] == 100
    row, = doc["results"]
    assert row["outputs_equal"]
    a = 64 * doc["links"]["n_embd"] * 4
    split_runs = [r for r in row["runs"].values() if r["on"] == "split"]
    assert len(split_runs) == 4
    for r in split_runs:   # every run on the workers was counted: at least the first stage's input crossed
        assert len(r["coordinator_bytes"]) == 1 and r["coordinator_sent_per_ubatch"] >= a * 0.9, r


@pytest.mark.parametrize("argv,message", [
    (["--link-model", "per-worker"], "--link-model goes with --link-rate"),
    (["--link-delay", "5"], "--link-delay goes with --link-rate"),
    (["--link-rate", "50", "--rpc", "127.0.0.1:1"], "not with --rpc, --gpu or --devices"),
    (["--link-rate", "-1"], "--link-rate is in Mbit/s"),
    (["--link-rate", "50", "--link-model", "ring"], "invalid choice: 'ring'"),
])
def test_bench_link_options_are_checked(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        parse_args([*argv, "--out", str(tmp_path)])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_bench_without_root_says_why(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(links, "_available", "network namespaces and tc need root")
    with pytest.raises(SystemExit) as e:
        parse_args(["--link-rate", "50", "--out", str(tmp_path)])
    assert e.value.code == 2
    assert ("--link-rate needs root and iproute2 (ip, tc), and network namespaces: network namespaces and tc need "
            "root") in capsys.readouterr().err


@needs_links
def test_direct_copies_keep_the_coordinators_bytes_within_two_activations_per_ubatch():
    """3 workers behind 200 Mbit/s links of their own, a model wide enough that activations dominate (1024 wide):
    counted on the coordinator's interface, headers included, a pipelined prefill moves at most 2 A per ubatch (the
    first stage's input, the mask, the graphs, the logits; A = n_ubatch x n_embd x 4), where relaying moves at least
    2 (S - 1) A more. Both bit-equal to the standard path."""
    from pyturbo import synth
    path = synth.cached_model(synth.ModelShape(n_layer=3, n_embd=1024, n_ff=1024, n_head=8, n_head_kv=2,
                                               n_vocab=1000, dtype="f16"))
    tokens, n_ubatch = prompt(1024, n_vocab=1000), 128
    with links.Links(3, rate=200, model="per-worker") as net, \
            Model(path, rpc_servers=net.endpoints, tensor_split="even") as m:
        a = n_ubatch * m.n_embd * 4
        moved, logits = {}, {}
        for pipe, transfers in [("off", "direct"), ("force", "relay"), ("force", "direct")]:
            with m.context(n_ctx=1088, n_batch=1024, n_ubatch=n_ubatch, n_threads=1, rpc_transfers=transfers) as ctx:
                before = net.coordinator_bytes()
                res = ctx.prefill(tokens, pipeline=pipe)
                moved[pipe, transfers] = (net.coordinator_bytes() - before).total / res.n_ubatches
                logits[pipe, transfers] = ctx.logits().copy()
        assert all(np.array_equal(v, logits["off", "direct"]) for v in logits.values())
        assert moved["force", "direct"] <= 2 * a, (moved, a)
        assert moved["force", "relay"] - moved["force", "direct"] >= 0.9 * 2 * (len(m.devices) - 1) * a, (moved, a)

"""Local llama.cpp RPC workers for tests, benchmarks and single-host use: `with pyturbo.workers.local(4) as w:`."""
from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path
from typing import Iterator, Mapping, Sequence

from ..errors import WorkerError


def free_port() -> int:
    """A port nothing listens on now (for tests that need a dead address; workers choose their own port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_port(proc: subprocess.Popen, log, timeout: float) -> int:
    """The port a worker started with --port reports on its first line of stdout once it listens ("listening on
    HOST:PORT"). The worker bound it itself, so nothing else can have taken it meanwhile."""
    deadline = time.monotonic() + timeout
    line = b""
    while not line.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0:
            raise WorkerError(f"the RPC worker (pid {proc.pid}) did not report its port within {timeout:.0f} s")
        ready, _, _ = select.select([proc.stdout], [], [], min(left, 0.5))
        chunk = os.read(proc.stdout.fileno(), 256) if ready else b""
        if ready and not chunk:  # stdout closed: the worker exited
            proc.wait(timeout=5)
            log.seek(0)
            why = log.read().decode(errors="replace").strip().splitlines()[-3:]
            raise WorkerError(f"the RPC worker exited with code {proc.returncode} before listening: "
                              f"{' / '.join(why) or 'no output'}")
        line += chunk
    proc.stdout.close()
    words = line.decode(errors="replace").split()
    if len(words) != 3 or words[:2] != ["listening", "on"]:
        raise WorkerError(f"the RPC worker (pid {proc.pid}) reported {line!r} instead of 'listening on HOST:PORT'")
    return int(words[2].rpartition(":")[2])


def _stop_procs(procs: list) -> None:
    """Stop worker processes: continue any that are paused (a stopped process does not act on SIGTERM), terminate,
    and kill what is still there after 5 s."""
    alive = [p for p in procs if p is not None and p.poll() is None]
    for p in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p.pid, signal.SIGCONT)
            p.terminate()
    for p in alive:
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


class WorkerPool:
    """RPC worker processes on 127.0.0.1; `endpoints` go to Model(rpc_servers=...). stop() always ends them, and so
    does dropping the pool (or the end of this process). Each worker binds its own port (`--port 0`) and reports it,
    so no other program can take a port between its choice and its use.

    For workers elsewhere than this host's loopback (pyturbo.tools.links runs them in network namespaces): `host` is
    the address each worker binds and its endpoint names (one for all, or one per worker); `prefix[i]` is put before
    worker i's command and must exec it in the same process (`ip netns exec NAME`), so that kill, pause and
    --exit-with-parent reach the worker itself; `env` adds environment variables (e.g. PYTURBO_RPC_TOKEN) and
    `extra_args` arguments of `python -m pyturbo.worker`."""

    def __init__(self, n: int, threads: int = 1, device: str = "", start_timeout: float = 60.0,
                 log_dir: str | os.PathLike | None = None, *, host: str | Sequence[str] = "127.0.0.1",
                 prefix: Sequence[Sequence[str]] | None = None, env: Mapping[str, str] | None = None,
                 extra_args: Sequence[str] = ()):
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"need at least one worker, not {n!r}")
        self.hosts = [host] * n if isinstance(host, str) else list(host)
        self.prefix = [[]] * n if prefix is None else [list(p) for p in prefix]
        if len(self.hosts) != n or len(self.prefix) != n:
            raise ValueError(f"{n} workers need one host and one prefix each, not {len(self.hosts)} and "
                             f"{len(self.prefix)}")
        self.env = dict(os.environ, **env) if env else None
        self.extra_args = [str(a) for a in extra_args]
        self.threads, self.device, self.start_timeout = threads, device, start_timeout
        self.log_dir = Path(log_dir) if log_dir else None
        self.procs: list[subprocess.Popen | None] = [None] * n
        self.ports: list[int] = [0] * n
        self._logs: list = [None] * n
        self._finalizer = weakref.finalize(self, _stop_procs, self.procs)
        try:
            for i in range(n):  # all start at once, then each reports its port
                self._spawn(i, 0)
            for i in range(n):
                self.ports[i] = read_port(self.procs[i], self._logs[i], start_timeout)
        except BaseException:
            self.stop()
            raise

    def _spawn(self, i: int, port: int) -> None:
        cmd = [*self.prefix[i], sys.executable, "-m", "pyturbo.worker", "--port", str(port),
               "--threads", str(self.threads), "--exit-with-parent", str(os.getpid())]
        if self.hosts[i] != "127.0.0.1":
            cmd += ["--host", self.hosts[i]]
        if self.device:
            cmd += ["--device", self.device]
        cmd += self.extra_args
        log = open(self.log_dir / f"worker{i}.log", "w+b") if self.log_dir else tempfile.TemporaryFile()
        if self._logs[i] is not None:
            self._logs[i].close()
        self._logs[i] = log
        self.procs[i] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, env=self.env)

    @property
    def endpoints(self) -> list[str]:
        return [f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in zip(self.hosts, self.ports)]

    def kill(self, i: int) -> None:
        """Kill worker i at once (SIGKILL; for failure tests)."""
        self.procs[i].kill()
        self.procs[i].wait()

    def pause(self, i: int) -> None:
        """Stop worker i (SIGSTOP): it keeps its connections but answers nothing, like a hung host."""
        os.kill(self.procs[i].pid, signal.SIGSTOP)

    def resume(self, i: int) -> None:
        """Let a paused worker i go on (SIGCONT)."""
        os.kill(self.procs[i].pid, signal.SIGCONT)

    def restart(self, i: int) -> None:
        """Replace worker i by a new one on the same port (so `endpoints` stay valid); WorkerError if it cannot have
        the port back. Models that used the old worker are dead: close them first, or the new model shares their
        broken connection."""
        _stop_procs([self.procs[i]])
        self._spawn(i, self.ports[i])
        self.ports[i] = read_port(self.procs[i], self._logs[i], self.start_timeout)

    def stop(self) -> None:
        self._finalizer()
        for log in self._logs:
            if log is not None:
                log.close()

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


@contextlib.contextmanager
def local(n: int, threads: int = 1, device: str = "", **kwargs) -> Iterator[WorkerPool]:
    """Start n RPC workers on free loopback ports; they are stopped when the block ends, whatever happens."""
    pool = WorkerPool(n, threads=threads, device=device, **kwargs)
    try:
        yield pool
    finally:
        pool.stop()

"""Local llama.cpp RPC workers for tests, benchmarks and single-host use: `with pyturbo.workers.local(4) as w:`."""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

from ..errors import WorkerError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise WorkerError(f"the RPC worker on port {port} exited with code {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise WorkerError(f"the RPC worker on port {port} did not start listening within {timeout:.0f} s")


class WorkerPool:
    """RPC worker processes on 127.0.0.1; `endpoints` go to Model(rpc_servers=...). stop() always ends them."""

    def __init__(self, n: int, threads: int = 1, device: str = "", start_timeout: float = 60.0,
                 log_dir: str | os.PathLike | None = None):
        if n < 1:
            raise ValueError(f"need at least one worker, not {n}")
        self.procs: list[subprocess.Popen] = []
        self.ports: list[int] = []
        try:
            for i in range(n):
                port = free_port()
                cmd = [sys.executable, "-m", "pyturbo.worker", "--port", str(port), "--threads", str(threads),
                       "--exit-with-parent", str(os.getpid())]
                if device:
                    cmd += ["--device", device]
                out = open(Path(log_dir) / f"worker{i}.log", "wb") if log_dir else subprocess.DEVNULL
                self.procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
                self.ports.append(port)
            for port, proc in zip(self.ports, self.procs):
                wait_listening(port, proc, start_timeout)
        except BaseException:
            self.stop()
            raise

    @property
    def endpoints(self) -> list[str]:
        return [f"127.0.0.1:{p}" for p in self.ports]

    def kill(self, i: int) -> None:
        """Kill worker i at once (for failure tests)."""
        self.procs[i].kill()
        self.procs[i].wait()

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

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

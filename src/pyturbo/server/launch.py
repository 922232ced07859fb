"""Start `python -m pyturbo.server` as a child process on 127.0.0.1 and wait until it serves (for the TTFT bench
and the tests): a free port, a bounded wait, the log kept in a file."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from ..tools.workers import free_port


def start(args: list[str], log_path: Path, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """The server process and its base URL; args are the server's options, without --host/--port."""
    port = free_port()
    cmd = [sys.executable, "-m", "pyturbo.server", *map(str, args), "--host", "127.0.0.1", "--port", str(port)]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})))
    return proc, f"http://127.0.0.1:{port}"


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float, log_path: Path | None = None) -> dict:
    """/health once it answers 200; RuntimeError if the process ends first, TimeoutError after timeout seconds."""
    import httpx
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode}:\n{tail(log_path)}")
        try:
            r = httpx.get(url + "/health", timeout=2)
            last = r.json()
            if r.status_code == 200:
                return last
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.2)
    raise TimeoutError(f"the server was not healthy within {timeout:.0f} s (last /health: {last}):\n{tail(log_path)}")


def stop(proc: subprocess.Popen, timeout: float = 15) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def tail(log_path: Path | None, n: int = 4000) -> str:
    return log_path.read_bytes()[-n:].decode(errors="replace") if log_path and log_path.exists() else ""

"""A live `python -m pyturbo.server` on 127.0.0.1 for tests (pyturbo.server.launch), stopped when the block ends."""
from __future__ import annotations

from pathlib import Path

from pyturbo.server import launch


class ServerProcess:
    def __init__(self, args: list[str], log_path: Path, env: dict | None = None, start_timeout: float = 120.0):
        self.log_path = log_path
        self.proc, self.url = launch.start(args, log_path, env)
        try:
            self.wait_healthy(start_timeout)
        except BaseException:
            self.stop()
            raise

    def wait_healthy(self, timeout: float) -> dict:
        return launch.wait_healthy(self.url, self.proc, timeout, self.log_path)

    def log_tail(self, n: int = 4000) -> str:
        return launch.tail(self.log_path, n)

    def stop(self) -> None:
        launch.stop(self.proc)

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

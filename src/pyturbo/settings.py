"""Every environment switch pyturbo reads, in one registry: its name, default, meaning and when it is read.

`read(name)` is the only place the library reads its switches from the environment (a test checks that no other
module does); each value is validated here, once per read, and a bad one raises ValueError naming the switch and
what it accepts. Two switches are diagnostics of the C executor, which reads them itself in one place
(src/llama-turbo/turbo-clock.cpp, `turbo_switch`). The build's switches are read by CMake and vendor/llama.cpp/fetch.py.
`python -m pyturbo.settings` prints the README's table (tests/test_settings.py checks that they agree).
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping


def _choice(*choices: str) -> Callable[[str, str], str]:
    def parse(name: str, raw: str) -> str:
        value = raw.strip().lower() or choices[0]
        if value not in choices:
            raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}, not {raw!r}")
        return value
    return parse


def _flag(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    raise ValueError(f"{name} must be 0 or 1, not {raw!r}")


def _count_or_auto(name: str, raw: str) -> str | int:
    value = raw.strip().lower() or "auto"
    if value == "auto":
        return value
    if not (value.isdigit() and int(value) >= 1):
        raise ValueError(f"{name} must be 'auto' or a count >= 1, not {raw!r}")
    return int(value)


def _path(default: Path) -> Callable[[str, str], Path]:
    def parse(name: str, raw: str) -> Path:
        return Path(raw.strip()).expanduser() if raw.strip() else default
    return parse


def _path_or_off(default: Path) -> Callable[[str, str], Path | None]:
    def parse(name: str, raw: str) -> Path | None:
        if raw.strip().lower() == "off":
            return None
        return _path(default)(name, raw)
    return parse


def _text(name: str, raw: str) -> str:
    if "\0" in raw:
        raise ValueError(f"{name} must not contain NUL characters")
    return raw


CACHE = Path.home() / ".cache" / "pyturbo"


@dataclass(frozen=True)
class Switch:
    name: str
    default: str        # as written in the README
    meaning: str
    read_when: str
    parse: Callable[[str, str], object] | None = None   # None: not read by the Python library (C, or the build)


SWITCHES: dict[str, Switch] = {s.name: s for s in [
    Switch("PYTURBO_PIPELINE", "auto", "`force` or `off` replaces `pipeline=\"auto\"`'s decision", "context creation",
           _choice("auto", "force", "off")),
    Switch("PYTURBO_CALIBRATION", "~/.cache/pyturbo/calibration.json",
           "where auto's measurements and `tensor_split=\"auto\"`'s balances are kept; `off`: in memory only",
           "first use in a process", _path_or_off(CACHE / "calibration.json")),
    Switch("PYTURBO_GPU_STREAMS", "auto", "CUDA devices made of a single GPU (`auto`: 4 where that pays, or a count)",
           "library load", _count_or_auto),
    Switch("GGML_CUDA_DEVICES", "(unset)", "llama.cpp's own layout of CUDA devices; when set it wins over "
           "PYTURBO_GPU_STREAMS", "library load", _text),
    Switch("PYTURBO_RPC_TOKEN", "(none)", "the shared secret of the coordinator and its RPC workers (`Model(rpc_token=)` "
           "overrides)", "`Model()`, worker start", _text),
    Switch("PYTURBO_PIPELINE_HOST_STAGING", "0", "`1`: every transfer between devices through host memory (tests)",
           "context creation", _flag),
    Switch("PYTURBO_CACHE", "~/.cache/pyturbo/models", "where synthetic models are written", "each use",
           _path(CACHE / "models")),
    Switch("PYTURBO_COMMIT", "(git)", "the commit bench reports name (a copied tree has no .git)", "bench report",
           _text),
    Switch("LLAMA_TURBO_SPIN", "(by layout)", "`0`/`1`: stage threads sleep / spin while their next split is near",
           "each pipelined prefill (C)"),
    Switch("LLAMA_TURBO_TRACE", "(unset)", "set: print the host's checkpoints of each pipelined prefill to stderr",
           "each pipelined prefill (C)"),
    Switch("PYTURBO_CUDA", "AUTO", "build the CUDA backend: `ON`, `OFF`, `AUTO` (a GPU and nvcc present)",
           "`pip install`"),
    Switch("PYTURBO_LLAMA_CPP_DIR", "(the pinned sdist)", "build against this llama.cpp tree (a patched copy)",
           "`pip install`"),
    Switch("PYTURBO_LLAMA_SDIST", "(downloaded)", "the pinned llama-cpp-python sdist file, instead of downloading it",
           "`pip install`"),
]}


def read(name: str, env: Mapping[str, str] | None = None):
    """The validated value of switch `name` in env (default: this process's environment)."""
    switch = SWITCHES[name]
    if switch.parse is None:
        raise KeyError(f"{name} is not read by the Python library ({switch.read_when})")
    return switch.parse(name, (os.environ if env is None else env).get(name, ""))


def is_set(name: str, env: Mapping[str, str] | None = None) -> bool:
    return name in (os.environ if env is None else env)


def markdown_table() -> str:
    rows = ["| switch | default | meaning | read |", "|---|---|---|---|"]
    rows += [f"| `{s.name}` | {s.default} | {s.meaning} | {s.read_when} |" for s in SWITCHES.values()]
    return "\n".join(rows)


if __name__ == "__main__":
    sys.stdout.write(markdown_table() + "\n")

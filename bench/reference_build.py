"""Stock llama-server and rpc-server from the pinned llama.cpp, built for bench/server_reference.py.

    python bench/reference_build.py            # fetch the source if missing, configure, build (reused when present)

The source is the same pinned llama-cpp-python sdist that the package build uses, obtained by the package's own
vendor/llama.cpp/fetch.py (its fetch_upstream: PYTURBO_LLAMA_SDIST or pip, the sha256 checked against pin.json), but
with more of the sdist's llama.cpp tree extracted (common/ and tools/, which the library build leaves out) and without
pyturbo's patches: the reference is stock llama.cpp. Everything lands in build/reference/ (git-ignored):
llama.cpp/ (the source), cmake/ (the build; binaries in cmake/bin). CPU and RPC backends, Release, nothing downloaded
at build time (no web UI assets, no curl/OpenSSL), and only the two targets.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENDOR = ROOT / "vendor" / "llama.cpp"
REFERENCE = ROOT / "build" / "reference"
SOURCE = REFERENCE / "llama.cpp"
BUILD = REFERENCE / "cmake"
# what the server and rpc-server need of the sdist's tree beyond what the library build extracts
EXTRA_SUBTREE = ["common", "tools", "scripts"]
CMAKE_OPTIONS = {
    "CMAKE_BUILD_TYPE": "Release",
    "BUILD_SHARED_LIBS": "OFF",          # self-contained binaries: no library path shared with pyturbo's own build
    "GGML_RPC": "ON",
    "GGML_RPC_RDMA": "OFF",              # TCP only, as pyturbo's build
    "GGML_CUDA": "OFF",
    "GGML_BACKEND_DL": "OFF",
    "LLAMA_CURL": "OFF",                 # (ignored with a note by newer trees, which have no curl option)
    "LLAMA_OPENSSL": "OFF",
    "LLAMA_BUILD_COMMON": "ON",
    "LLAMA_BUILD_TOOLS": "ON",
    "LLAMA_BUILD_SERVER": "ON",
    "LLAMA_BUILD_TESTS": "OFF",
    "LLAMA_BUILD_EXAMPLES": "OFF",
    "LLAMA_BUILD_APP": "OFF",
    "LLAMA_BUILD_UI": "OFF",             # no npm build of the web UI ...
    "LLAMA_USE_PREBUILT_UI": "OFF",      # ... and no download of it: the server runs with --no-webui
}


def log(msg: str) -> None:
    print(f"[reference] {msg}", file=sys.stderr, flush=True)


def _pin() -> dict:
    return json.loads((VENDOR / "pin.json").read_text())


def _can_fetch(python: str) -> bool:
    """fetch.py's pip download reads the sdist's metadata without build isolation: it needs scikit-build-core (the
    package's build requirement) importable in the interpreter that runs it."""
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('scikit_build_core') is None)"
    return subprocess.run([python, "-c", probe], capture_output=True).returncode == 0


def fetch_python() -> str:
    """An interpreter that can run fetch.py's download: this one, else python3 on PATH."""
    if os.environ.get("PYTURBO_LLAMA_SDIST") or _can_fetch(sys.executable):
        return sys.executable
    other = shutil.which("python3")
    if other and _can_fetch(other):
        return other
    raise SystemExit("[reference] fetching the llama.cpp source needs scikit-build-core (the package's build "
                     "requirement; pip reads the sdist's metadata with it): pip install scikit-build-core, or set "
                     "PYTURBO_LLAMA_SDIST to a downloaded copy of the pinned sdist "
                     f"({_pin()['sdist_file']})")


def ensure_source() -> Path:
    """build/reference/llama.cpp: the pinned sdist's llama.cpp tree with common/ and tools/, unpatched; fetched by
    fetch.py the first time (it keeps a stamp of the sdist's sha256 and skips the work when that matches)."""
    pin = _pin()
    pin = dict(pin, subtree=list(dict.fromkeys(pin["subtree"] + EXTRA_SUBTREE)))
    stamp = SOURCE / ".pyturbo-stamp"
    if stamp.exists() and stamp.read_text().strip() == pin["sdist_sha256"]:
        return SOURCE
    log(f"obtaining the llama.cpp source of {pin['sdist_name']}=={pin['sdist_version']} (llama.cpp "
        f"{pin['commit']}) with vendor/llama.cpp/fetch.py into {SOURCE.relative_to(ROOT)}")
    code = ("import json, sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]); import fetch; "
            "fetch.fetch_upstream(json.loads(sys.argv[2]), Path(sys.argv[3]))")
    SOURCE.parent.mkdir(parents=True, exist_ok=True)
    res = subprocess.run([fetch_python(), "-c", code, str(VENDOR), json.dumps(pin), str(SOURCE)])
    if res.returncode != 0:
        raise SystemExit(f"[reference] fetching the llama.cpp source failed (exit {res.returncode})")
    return SOURCE


def target_names(source: Path) -> dict[str, str]:
    """The CMake targets of the two binaries: the RPC server is 'ggml-rpc-server' in newer trees, 'rpc-server' in
    older ones (read from tools/rpc/CMakeLists.txt)."""
    rpc = "rpc-server"
    text = (source / "tools" / "rpc" / "CMakeLists.txt").read_text()
    m = re.search(r"set\(TARGET\s+([\w-]+)\)", text)
    if m:
        rpc = m.group(1)
    return {"server": "llama-server", "rpc": rpc}


def binaries(build: Path = BUILD) -> dict[str, Path] | None:
    """{"server": path, "rpc": path} where both are built, else None."""
    if not (SOURCE / "tools" / "rpc" / "CMakeLists.txt").exists():
        return None
    found = {k: build / "bin" / name for k, name in target_names(SOURCE).items()}
    return found if all(p.is_file() and os.access(p, os.X_OK) for p in found.values()) else None


def _run_streamed(cmd: list[str], what: str) -> None:
    """Run a build step with its output shown as it comes (the [n/N] or [ nn%] lines are the progress). Git stops
    at build/reference: the tree has no .git, and llama.cpp's build-info would otherwise take pyturbo's commit for
    its own (and re-configure on every pyturbo commit)."""
    log(f"{what}: {' '.join(cmd)}")
    t0 = time.monotonic()
    res = subprocess.run(cmd, env=dict(os.environ, GIT_CEILING_DIRECTORIES=str(REFERENCE)))
    if res.returncode != 0:
        raise SystemExit(f"[reference] {what} failed (exit {res.returncode})")
    log(f"{what}: done in {time.monotonic() - t0:.0f} s")


def build(jobs: int | None = None, force: bool = False) -> dict[str, Path]:
    """Fetch (if missing), configure and build llama-server and the RPC server; reused when already built (cmake's
    own up-to-date check runs anyway, in seconds). Returns their paths."""
    if not force and (found := binaries()) is not None:
        log(f"reusing {', '.join(str(p.relative_to(ROOT)) for p in found.values())}")
        return found
    source = ensure_source()
    if shutil.which("cmake") is None:
        raise SystemExit("[reference] cmake is not on PATH")
    t0 = time.monotonic()
    options = dict(CMAKE_OPTIONS, LLAMA_BUILD_COMMIT=_pin()["commit"])   # what llama-server --version reports
    cmd = ["cmake", "-S", str(source), "-B", str(BUILD), *(f"-D{k}={v}" for k, v in options.items())]
    if shutil.which("ninja") and not (BUILD / "CMakeCache.txt").exists():
        cmd += ["-G", "Ninja"]
    _run_streamed(cmd, "configure")
    names = target_names(source)
    jobs = jobs or os.cpu_count() or 2
    _run_streamed(["cmake", "--build", str(BUILD), "--config", "Release", "-j", str(jobs), "--target",
                   names["server"], names["rpc"]], f"build ({jobs} jobs)")
    found = binaries()
    if found is None:
        raise SystemExit(f"[reference] the build finished but {BUILD / 'bin'} lacks {list(names.values())}")
    log(f"built in {time.monotonic() - t0:.0f} s: {', '.join(str(p) for p in found.values())}")
    return found


def main(argv: list[str] | None = None) -> int:
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=None, help="parallel compile jobs (default: all cores)")
    ap.add_argument("--force", action="store_true", help="run cmake's configure and build even when both exist")
    args = ap.parse_args(argv)
    for name, path in build(args.jobs, args.force).items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

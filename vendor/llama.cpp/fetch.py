#!/usr/bin/env python3
"""Obtain, verify and patch the pinned llama.cpp tree for the build.

Run by CMakeLists.txt at configure time; prints the path of the patched tree as its last line.

Where the upstream tree comes from, in this order:
  1. a tree the user names (--source, from PYTURBO_LLAMA_CPP_DIR or -DPYTURBO_LLAMA_CPP_DIR);
  2. vendor/llama.cpp/upstream, already fetched and stamped with the pin's sdist hash;
  3. otherwise pip downloads the pinned llama-cpp-python sdist by name (or PYTURBO_LLAMA_SDIST names the file),
     its sha256 is checked against the pin, and only the subtree the build needs is extracted.

The patched copy (vendor/llama.cpp/patched) is rebuilt from scratch whenever the source or the patch set changes,
so applying patches never happens twice on the same tree. Nothing here is ever committed (see vendor/llama.cpp/.gitignore).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

STAMP = ".pyturbo-stamp"


def log(msg: str) -> None:
    print(f"[pyturbo] {msg}", file=sys.stderr, flush=True)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download_sdist(pin: dict, dest: Path) -> Path:
    """pip fetches the sdist by package name; no host name is spelled out here."""
    spec = f"{pin['sdist_name']}=={pin['sdist_version']}"
    log(f"fetching {spec} (source distribution) with pip")
    # --no-build-isolation: pip only reads the sdist's metadata, with the scikit-build-core this build already has.
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "--no-build-isolation", "--disable-pip-version-check", "-d", str(dest), spec]
    res = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if res.returncode != 0:
        sys.exit(f"[pyturbo] could not download {spec}:\n{res.stdout}\n"
                 "Set PYTURBO_LLAMA_SDIST to a downloaded copy of the file, or PYTURBO_LLAMA_CPP_DIR to a llama.cpp tree.")
    path = dest / pin["sdist_file"]
    if not path.exists():
        sys.exit(f"[pyturbo] pip did not produce {path.name}; got: {[p.name for p in dest.iterdir()]}")
    return path


def fetch_upstream(pin: dict, upstream: Path) -> None:
    stamp = upstream / STAMP
    if stamp.exists() and stamp.read_text().strip() == pin["sdist_sha256"]:
        return
    with tempfile.TemporaryDirectory(prefix="pyturbo-sdist-") as tmp:
        given = os.environ.get("PYTURBO_LLAMA_SDIST")
        sdist = Path(given) if given else download_sdist(pin, Path(tmp))
        digest = sha256_file(sdist)
        if digest != pin["sdist_sha256"]:
            sys.exit(f"[pyturbo] sha256 mismatch for {sdist}: got {digest}, pinned {pin['sdist_sha256']}")
        log(f"verified {sdist.name} (sha256 {digest[:16]}...), extracting the llama.cpp subtree")
        if upstream.exists():
            shutil.rmtree(upstream)
        prefix = pin["tree_in_sdist"].rstrip("/") + "/"
        subtree = pin["subtree"]
        with tarfile.open(sdist) as tar:
            members = []
            for m in tar.getmembers():
                if not (m.isfile() or m.isdir()) or not m.name.startswith(prefix):
                    continue
                rel = m.name[len(prefix):]
                if not any(rel == p or rel.startswith(p + "/") for p in subtree):
                    continue
                m.name = rel
                members.append(m)
            upstream.mkdir(parents=True)
            tar.extractall(upstream, members=members, filter="data")
    stamp.write_text(pin["sdist_sha256"] + "\n")


def tree_fingerprint(src: Path) -> str:
    """Path plus newest mtime: enough to notice that a user's tree changed."""
    newest = max((p.stat().st_mtime for d in ("src", "ggml", "include") for p in (src / d).rglob("*") if p.is_file()),
                 default=0.0)
    return f"{src.resolve()}@{newest:.0f}"


def apply_patch(tree: Path, patch: Path) -> None:
    if shutil.which("git"):
        cmd = ["git", "apply", "--whitespace=nowarn", "-p1", str(patch.resolve())]
    else:
        cmd = ["patch", "-p1", "--forward", "--quiet", "-i", str(patch.resolve())]
    # keep git from finding an enclosing repository (ours): inside one, git apply skips paths outside the cwd
    env = dict(os.environ, GIT_CEILING_DIRECTORIES=str(tree.resolve().parent))
    res = subprocess.run(cmd, cwd=tree, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if res.returncode != 0:
        sys.exit(f"[pyturbo] patch {patch.name} does not apply to the llama.cpp tree:\n{res.stdout}")


def prepare(source: Path, patches: list[Path], patched: Path, source_id: str) -> None:
    h = hashlib.sha256(source_id.encode())
    h.update(Path(__file__).read_bytes())  # a change to how patches are applied redoes the copy too
    for p in patches:
        h.update(p.name.encode())
        h.update(p.read_bytes())
    want = h.hexdigest()
    stamp = patched / STAMP
    if stamp.exists() and stamp.read_text().strip() == want:
        return
    log(f"preparing a patched copy of llama.cpp ({len(patches)} patch(es))")
    if patched.exists():
        shutil.rmtree(patched)
    shutil.copytree(source, patched, ignore=shutil.ignore_patterns(".git", STAMP, "build"))
    for p in patches:
        log(f"applying {p.name}")
        apply_patch(patched, p)
    stamp.write_text(want + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vendor", type=Path, required=True, help="vendor/llama.cpp (holds pin.json)")
    ap.add_argument("--patches", type=Path, required=True, help="directory of *.patch files, applied in name order")
    ap.add_argument("--source", default="", help="a local llama.cpp tree to use instead of the pinned sdist")
    args = ap.parse_args()

    pin = json.loads((args.vendor / "pin.json").read_text())
    if args.source:
        source = Path(args.source).expanduser()
        if not (source / "src" / "llama-context.cpp").exists():
            sys.exit(f"[pyturbo] {source} does not look like a llama.cpp tree (no src/llama-context.cpp)")
        source_id = "local:" + tree_fingerprint(source)
        log(f"using the llama.cpp tree at {source} (not the pinned {pin['commit']})")
    else:
        source = args.vendor / "upstream"
        fetch_upstream(pin, source)
        source_id = "pin:" + pin["sdist_sha256"]
    patches = sorted(args.patches.glob("*.patch"))
    patched = args.vendor / "patched"
    prepare(source, patches, patched, source_id)
    print(patched.resolve())


if __name__ == "__main__":
    main()

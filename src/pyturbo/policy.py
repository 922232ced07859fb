"""Which prefill path to take: the one place that decides whether pipelining is *useful* (the executor in
src/llama-turbo/ checks whether it is *safe*, and falls back to the standard path with its reason when it is not).

auto decides from measurement, not from a rule fitted to one machine: every prefill's throughput is recorded per
setting (model, layout, batch sizes, prompt-length bucket) and path, and once both paths have been measured the faster
one is taken (`Calibration`, persisted per machine). `decide()` is a pure function of what the caller asked, the
layout and those measurements, so it is tested without devices (tests/test_policy.py).
"""
from __future__ import annotations

import atexit
import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

MODES = ("auto", "force", "off")


def normalize_mode(pipeline) -> str:
    """prefill(pipeline=...) -> "auto" | "force" | "off". True means auto: pipelined where that is faster."""
    if pipeline is True or pipeline == "auto":
        return "auto"
    if pipeline is False or pipeline == "off":
        return "off"
    if pipeline == "force":
        return "force"
    raise ValueError(f"pipeline must be 'auto' (or True), 'force' or 'off' (or False), not {pipeline!r}")


def env_override(env: dict) -> str | None:
    """PYTURBO_PIPELINE=force|off replaces the auto decision (both directions); unset or 'auto': no override."""
    value = env.get("PYTURBO_PIPELINE", "").strip().lower()
    if value in ("", "auto"):
        return None
    if value not in ("force", "off"):
        raise ValueError(f"PYTURBO_PIPELINE must be 'auto', 'force' or 'off', not {value!r}")
    return value


@dataclass(frozen=True)
class Layout:
    """What the decision needs to know about a context's devices (the rest it learns by measuring)."""
    stock_overlaps: bool      # llama.cpp's own pipeline parallelism is on (every device has events, async copies)


def decide(mode: str, layout: Layout, override: str | None = None,
           measured: dict[str, list[float]] | None = None) -> tuple[bool, str]:
    """(ask the executor for the pipeline?, why). mode is normalize_mode()'s, override env_override()'s, measured
    the Calibration's samples for this setting."""
    if mode == "auto" and override is not None:
        return override == "force", f"PYTURBO_PIPELINE={override}"
    if mode == "off":
        return False, "pipeline not requested"
    if mode == "force":
        return True, "pipeline forced"
    return decide_from_measurements(layout, measured or {})


# ---- calibration: measured throughput per setting, what "auto" decides from ------------------------------------------

SAMPLES_PER_PATH = 2   # warm runs of each path before auto trusts the comparison: one run of stock is too noisy
                       # (bench/results/2026-11-25-2xh100.md)
KEEP_SAMPLES = 8       # the newest samples kept per path and setting
SAVE_INTERVAL_S = 60.0  # samples beyond what a decision needs are written at most this often, and at exit


def length_bucket(n: int) -> int:
    """Prompt lengths within a factor of two share a bucket (their per-token costs are close)."""
    return max(int(n), 1).bit_length()


def calibration_key(model_id: str, stages: Sequence[tuple[str, str]], n_batch: int, n_ubatch: int, flash_attn,
                    n_tokens: int, n_past: int, layers: Sequence[int] | None = None,
                    first_ubatch: int | None = None) -> str:
    """What a measurement is valid for: the model file, the layout (device kinds and hosts, not ports: local workers
    get new ones every run, and the layers per stage where known: a rebalanced split is another layout), the batch
    settings (a first_ubatch is another schedule) and the prompt's length bucket and starting position bucket."""
    layout = ",".join(f"{kind}@{host}" if host else kind for kind, host in stages)
    if layers:
        layout += "/" + ",".join(map(str, layers))
    start = 0 if n_past == 0 else length_bucket(n_past)
    first = f"|first{first_ubatch}" if first_ubatch else ""
    return f"{model_id}|{layout}|b{n_batch}|ub{n_ubatch}{first}|fa{flash_attn}|len{length_bucket(n_tokens)}|at{start}"


class Calibration:
    """Prefill throughput (tok/s) measured per calibration_key() and path, kept in a JSON file so that a setting is
    calibrated once per machine. The file is $PYTURBO_CALIBRATION, or ~/.cache/pyturbo/calibration.json;
    PYTURBO_CALIBRATION=off keeps it in memory only. It also keeps the layer splits that tensor_split="auto" measured
    (pyturbo.balance). Entries name the model file's size and mtime and the native
    library's build, so a changed model or a rebuild starts afresh; `clear()` (or deleting the file) forgets all."""

    def __init__(self, path: Path | None):
        self.path = path
        self.samples: dict[str, dict[str, list[float]]] = {}
        self.splits: dict[str, dict] = {}     # balance.Balance.to_json() per balance.balance_key()
        self._loaded = False
        self._dirty = False                   # samples recorded since the last write
        self._saved_at = float("-inf")        # time.monotonic() of the last write
        self._flush_registered = False

    @classmethod
    def from_env(cls, env: dict) -> "Calibration":
        where = env.get("PYTURBO_CALIBRATION", "").strip()
        if where.lower() == "off":
            return cls(None)
        return cls(Path(where).expanduser() if where else Path.home() / ".cache" / "pyturbo" / "calibration.json")

    def measured(self, key: str) -> dict[str, list[float]]:
        """A copy of the samples for key: what a decision was made from stays as it was when later runs are recorded."""
        self._load()
        return {path: list(runs) for path, runs in self.samples.get(key, {}).items()}

    def record(self, key: str, path: str, tokens_per_second: float) -> None:
        """Add a sample. Written at once while the setting is still being calibrated (a later process must see it);
        after that every prefill records one, so the file is rewritten at most every SAVE_INTERVAL_S (and at exit)."""
        self._load()
        runs = self.samples.setdefault(key, {}).setdefault(path, [])
        calibrating = len(runs) < SAMPLES_PER_PATH
        runs.append(round(float(tokens_per_second), 1))
        del runs[:-KEEP_SAMPLES]
        if calibrating or time.monotonic() - self._saved_at >= SAVE_INTERVAL_S:
            self._save()
        else:
            self._dirty = True
            if not self._flush_registered:
                self._flush_registered = True
                atexit.register(self.flush)

    def flush(self) -> None:
        """Write samples not written yet."""
        if self._dirty:
            self._save()

    def stored_split(self, key: str) -> dict | None:
        """The layer split stored for key (balance.balance_key), as balance.Balance.to_json() made it, or None."""
        self._load()
        return self.splits.get(key)

    def store_split(self, key: str, split: dict) -> None:
        self._load()
        self.splits[key] = split
        self._save()

    def clear(self) -> None:
        self.samples, self.splits = {}, {}
        self._loaded = True
        if self.path is not None and self.path.exists():
            self.path.unlink()

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        if self.path is not None and self.path.exists():
            try:
                stored = json.loads(self.path.read_text())
                self.samples, self.splits = stored.get("samples", {}), stored.get("splits", {})
            except (OSError, ValueError, AttributeError):
                self.samples, self.splits = {}, {}   # unreadable: calibrate again rather than fail a prefill

    def _save(self) -> None:
        self._dirty, self._saved_at = False, time.monotonic()
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps({"samples": self.samples, "splits": self.splits}, indent=1))
            tmp.replace(self.path)   # atomic: a concurrent reader sees the old file or the new one
        except OSError:
            pass   # a read-only home must not fail prefills; the measurements stay in memory


_calibration: Calibration | None = None


def calibration() -> Calibration:
    """The process's Calibration (its file is chosen from the environment once, on first use)."""
    global _calibration
    if _calibration is None:
        _calibration = Calibration.from_env(dict(os.environ))
    return _calibration


def decide_from_measurements(layout: Layout, measured: dict[str, list[float]]) -> tuple[bool, str]:
    """auto's choice: the faster path by the medians of warm runs, once both paths have SAMPLES_PER_PATH of them;
    before that, where stock llama.cpp cannot overlap the stages, the pipeline; elsewhere the path with fewer runs
    (calibrating: each setting costs a few runs of the slower path once per machine)."""
    p, s = measured.get("pipelined", []), measured.get("standard", [])
    if len(p) >= SAMPLES_PER_PATH and len(s) >= SAMPLES_PER_PATH:
        mp, ms = statistics.median(p), statistics.median(s)
        return mp >= ms, (f"calibrated: pipelined {mp:.0f} vs standard {ms:.0f} tok/s "
                          f"(medians of {len(p)} and {len(s)} runs)")
    if not layout.stock_overlaps:
        return True, "llama.cpp's own pipeline parallelism is off on this layout (it would serialize the stages)"
    pipeline = len(p) <= len(s)
    return pipeline, (f"calibrating: {'pipelined' if pipeline else 'standard'} run {min(len(p), len(s)) + 1} of "
                      f"{SAMPLES_PER_PATH} (pipelined {len(p)}, standard {len(s)} runs so far)")

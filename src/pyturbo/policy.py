"""Which prefill path to take: the one place that decides whether pipelining is *useful* (the executor in
src/llama-turbo/ checks whether it is *safe*, and falls back to the standard path with its reason when it is not).

auto decides from measurement, not from a rule fitted to one machine: every prefill's throughput is recorded per
setting (model, layout, batch sizes, prompt-length bucket, and whether it was a context's first run of its path) and
path, with the time it ran, and once both paths have been measured the faster one is taken (`Calibration`, persisted
per machine). What was measured is not trusted forever (`current`): runs older than a day are forgotten, and where
runs depart from what their path measured before (a load came or went), what came before is forgotten and the other
path is measured again; where the paths are close, the slower one is re-run now and then. Prefills that share the
devices with other work (a server's decode steps between the chunks of a prompt, `shared_devices`) are neither
recorded nor used to measure: they decide from what was measured alone. `decide()` is a pure function of what the
caller asked, the layout, those measurements, the time and whether it may measure, so it is tested without devices
(tests/test_policy.py, with recorded timings).
"""
from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import json
import logging
import math
import os
import stat
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from . import settings

log = logging.getLogger("pyturbo")

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
    value = settings.read("PYTURBO_PIPELINE", env)
    return None if value == "auto" else value


@dataclass(frozen=True)
class Layout:
    """What the decision needs to know about a context's devices (the rest it learns by measuring)."""
    stock_overlaps: bool      # llama.cpp's own pipeline parallelism is on (every device has events, async copies)


def decide(mode: str, layout: Layout, override: str | None = None, measured: dict | None = None,
           now: float | None = None, measuring: bool | None = None) -> tuple[bool, str]:
    """(ask the executor for the pipeline?, why). mode is normalize_mode()'s, override env_override()'s, measured
    the Calibration's runs for this setting ({path: [(tok/s, time.time() of the run), ...]}; bare tok/s numbers are
    runs of unknown time), now the time.time() to judge their age by (None: no run is too old), measuring whether
    this run may serve to measure a path (None: unless this thread is inside shared_devices())."""
    if mode == "auto" and override is not None:
        return override == "force", f"PYTURBO_PIPELINE={override}"
    if mode == "off":
        return False, "pipeline not requested"
    if mode == "force":
        return True, "pipeline forced"
    if measuring is None:
        measuring = not devices_shared()
    return decide_from_measurements(layout, measured or {}, now, measuring)


# ---- prefills that share the devices with other work ---------------------------------------------------------------

_sharing = threading.local()


@contextlib.contextmanager
def shared_devices():
    """Within (this thread only): prefills run while other work takes turns on the devices, such as a server's
    decode steps between the chunks of a prompt. What they measure is not what the path does alone (smaller prefills,
    caches the other work left cold, a load), and auto judges the paths by runs alone: their throughput is not
    recorded (Calibration.record ignores it), and auto takes the path that the runs alone favour without measuring
    (no calibrating, exploring or re-checking, whose runs would go unrecorded)."""
    depth = getattr(_sharing, "depth", 0)
    _sharing.depth = depth + 1
    try:
        yield
    finally:
        _sharing.depth = depth


def devices_shared() -> bool:
    """Whether this thread is inside shared_devices()."""
    return getattr(_sharing, "depth", 0) > 0


# ---- the decision from measured runs -------------------------------------------------------------------------------

PATHS = ("pipelined", "standard")
SAMPLES_PER_PATH = 2    # runs of each path before auto trusts a close comparison: one run of stock is too noisy
                        # (bench/results/2026-11-25-2xh100.md)
CLEAR_MARGIN = 0.25     # ...but where one path is this much faster than the other, one run of each decides: run-to-run
                        # noise (±15% for stock on GPUs) does not reach it. Closer paths are also re-explored.
ESTIMATE_RUNS = 3       # a path's throughput: the median of its newest runs (older ones are history for DRIFT)
DRIFT = 0.25            # a run departs from its path's earlier runs when it is this much faster, or slower (1/1.25)
EXPLORE_EVERY = 16      # where the paths are within CLEAR_MARGIN, the slower one runs again after this many runs of
                        # the faster (costs at most CLEAR_MARGIN / EXPLORE_EVERY, 1.6%, of the time)
KEEP_SAMPLES = 16       # the newest runs kept per path and setting (at least EXPLORE_EVERY: they count the runs)
MAX_AGE_S = 24 * 3600.0  # a run older than this is forgotten: each path of a setting is measured at least once a day

Sample = tuple[float, float]   # (tok/s, time.time() when it ran)


def _as_samples(runs: Iterable) -> list[Sample]:
    """One path's runs as (tok/s, time), oldest first; a bare number is a run of unknown time (0)."""
    out = [(float(r), 0.0) if isinstance(r, (int, float)) else (float(r[0]), float(r[1])) for r in runs]
    return sorted(out, key=lambda s: s[1])   # stable: runs of equal times keep their order


def _departs(tps: float, reference: float) -> int:
    """+1 (faster) or -1 (slower) where tps departs from reference by more than DRIFT, else 0."""
    ratio = tps / reference
    return 1 if ratio > 1 + DRIFT else -1 if ratio < 1 / (1 + DRIFT) else 0


def departing_tail(runs: list[Sample], before: int = 1) -> list[Sample]:
    """The newest runs of one path that all depart, the same way, from the median of that path's runs before them
    (at least `before` of them): what the path measures now differs from what it measured before. [] where the newest
    does not."""
    tail: list[Sample] = []
    for k in range(1, len(runs) - before + 1):
        reference = statistics.median(tps for tps, _ in runs[:-k])
        ways = {_departs(tps, reference) for tps, _ in runs[-k:]}
        if ways in ({1}, {-1}):
            tail = runs[-k:]
    return tail


def current(measured: dict, now: float | None = None) -> dict[str, list[Sample]]:
    """What a decision may use of one setting's runs ({path: runs}, pure): runs more than MAX_AGE_S from now are
    forgotten; where two or more runs (of one path or of both) depart from what their path measured before, the
    conditions changed with the first of them, and every run before it, of either path, is forgotten (the comparison
    was made under other conditions); at most KEEP_SAMPLES runs per path, the newest.
    current(current(m)) == current(m)."""
    runs = {path: _as_samples(measured.get(path, ())) for path in PATHS}
    if now is not None:
        runs = {path: [s for s in r if abs(now - s[1]) <= MAX_AGE_S] for path, r in runs.items()}
    while True:
        runs = {path: r[-KEEP_SAMPLES:] for path, r in runs.items()}
        tails = [departing_tail(r) for r in runs.values()]
        if sum(map(len, tails)) < 2:   # one departing run may be noise: the re-check in decide_from_measurements
            return runs
        since = min(t for tail in tails for _, t in tail)
        kept = {path: [s for s in r if s[1] >= since] for path, r in runs.items()}
        if kept == runs:               # runs without times: nothing to cut by
            return runs
        runs = kept


def _estimate(runs: list[Sample]) -> float:
    return statistics.median(tps for tps, _ in runs[-ESTIMATE_RUNS:])


def decide_from_measurements(layout: Layout, measured: dict, now: float | None = None,
                             measuring: bool = True) -> tuple[bool, str]:
    """auto's choice from one setting's runs (see current()): the faster path by the medians of the newest runs,
    once each path has SAMPLES_PER_PATH runs, or one each where one path is CLEAR_MARGIN faster; before that the path
    with fewer runs (the pipeline first; where stock llama.cpp cannot overlap the stages that is the expected
    winner, but stock is measured as well: a slow CPU stage can make the pipeline the slower path). Once decided, the
    other path runs instead where it must be measured again: a run of one path departed from its earlier ones
    (re-checking; not where the chosen path's run departs slower and still beats the other by CLEAR_MARGIN) or, where
    the paths are close, after EXPLORE_EVERY runs of the faster (exploring). measuring=False (the devices are shared,
    the run is not recorded): the path the runs favour, nothing measured."""
    runs = current(measured, now)
    if not measuring:
        return _without_measuring(runs)
    p, s = runs["pipelined"], runs["standard"]
    margin = max(_estimate(p), _estimate(s)) / min(_estimate(p), _estimate(s)) - 1 if p and s else 0.0
    if not p or not s or (min(len(p), len(s)) < SAMPLES_PER_PATH and margin < CLEAR_MARGIN):
        pipeline = len(p) <= len(s)
        why = (f"calibrating: {'pipelined' if pipeline else 'standard'} run {min(len(p), len(s)) + 1} of "
               f"{SAMPLES_PER_PATH} (pipelined {len(p)}, standard {len(s)} runs so far)")
        if pipeline and not layout.stock_overlaps:
            why = f"llama.cpp's own pipeline parallelism is off on this layout (it would serialize the stages); {why}"
        return pipeline, why
    mp, ms = _estimate(p), _estimate(s)
    pipeline = mp >= ms
    why = (f"calibrated: pipelined {mp:.0f} vs standard {ms:.0f} tok/s (medians of the newest "
           f"{min(len(p), ESTIMATE_RUNS)} and {min(len(s), ESTIMATE_RUNS)} runs)")
    chosen, other = ("pipelined", "standard") if pipeline else ("standard", "pipelined")
    for path, rival in ((chosen, other), (other, chosen)):
        # one run at most here (two would have been a change, current()); judged against two earlier runs at least,
        # as one earlier run is as noisy as the departing one
        tail = departing_tail(runs[path], before=SAMPLES_PER_PATH)
        if not tail or runs[rival][-1][1] >= tail[0][1]:
            continue
        tps = tail[0][0]
        slower = tps < statistics.median(t for t, _ in runs[path][:-1])
        if path == chosen and slower and tps >= (1 + CLEAR_MARGIN) * _estimate(runs[rival]):
            # slower, yet still clearly ahead: the rival would have to have become faster under the change that made
            # this path slower to win, so measuring it would only cost a user a slow prefill
            why += (f"; {path}'s last run ({tps:.0f} tok/s) departs slower from its earlier ones but still beats "
                    f"{rival} by more than {CLEAR_MARGIN:.0%}: not re-checked")
            continue
        return rival == "pipelined", (f"{why}; re-checking: {path}'s last run ({tps:.0f} tok/s) departs from its "
                                      f"earlier ones by more than {DRIFT:.0%}, so {rival} is measured again")
    since = sum(1 for _, t in runs[chosen] if t > runs[other][-1][1])
    if margin < CLEAR_MARGIN and since >= EXPLORE_EVERY:
        return other == "pipelined", (f"{why}; exploring: {other} is measured again after {since} runs of {chosen} "
                                      f"(they are within {CLEAR_MARGIN:.0%})")
    return pipeline, why


def _without_measuring(runs: dict[str, list[Sample]]) -> tuple[bool, str]:
    """The path the runs favour, for a prefill that measures nothing: the faster estimate where both paths have
    runs, else the pipeline (the calibrating rule's first path)."""
    p, s = runs["pipelined"], runs["standard"]
    shared = "the devices are shared with other work, so nothing is measured now"
    if not p or not s:
        return True, f"{shared}; not measured alone yet (pipelined {len(p)}, standard {len(s)} runs): the pipeline"
    mp, ms = _estimate(p), _estimate(s)
    return mp >= ms, f"{shared}; measured alone: pipelined {mp:.0f} vs standard {ms:.0f} tok/s"


# ---- calibration: the runs per setting, kept in a file ------------------------------------------------------------

SAVE_INTERVAL_S = 60.0    # runs that change no decision are written at most this often, and at exit
LOCK_TIMEOUT_S = 2.0      # how long a write waits for another process's write (it takes milliseconds)
MAX_FILE_BYTES = 16 << 20  # a calibration file is kilobytes; a larger one is someone else's file


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


def first_run_key(key: str) -> str:
    """The key of a context's first runs of a path: they allocate (slots, compute buffers), so they are measured
    apart, as what a prefill costs in a fresh context (the one-prompt-per-context pattern decides from these)."""
    return key + "|first-run"


class Unusable(Exception):
    """The calibration file cannot be used (not a regular file, unreadable, too large): the message says why."""


def parse_calibration(doc) -> tuple[dict, dict, list[str]]:
    """A calibration file's content (as json.loads gives it) -> (samples, splits, problems): what has the right shape,
    and what was wrong with the rest (ignored, so measured again). Pure; never raises."""
    from .balance import Balance
    if not isinstance(doc, dict):
        return {}, {}, [f"it holds {type(doc).__name__}, not an object"]
    problems: list[str] = []
    samples: dict[str, dict[str, list[Sample]]] = {}
    raw = doc.get("samples", {})
    if not isinstance(raw, dict):
        problems.append(f"'samples' is {type(raw).__name__}, not an object")
        raw = {}
    for key, paths in raw.items():
        if not isinstance(paths, dict):
            problems.append(f"samples[{_short(key)}] is {type(paths).__name__}, not an object")
            continue
        entry = {}
        for path, runs in paths.items():
            if path not in PATHS or not isinstance(runs, list):
                problems.append(f"samples[{_short(key)}][{_short(path)}] is not a list of runs of a known path")
                continue
            good = [r for r in map(_sample, runs) if r is not None]
            if len(good) != len(runs):
                problems.append(f"samples[{_short(key)}][{path!r}] has runs that are not [tok/s > 0, time]")
            if good:
                entry[path] = sorted(good, key=lambda r: r[1])
        if entry:
            samples[key] = entry
    splits = {}
    raw = doc.get("splits", {})
    if not isinstance(raw, dict):
        problems.append(f"'splits' is {type(raw).__name__}, not an object")
        raw = {}
    for key, split in raw.items():
        try:
            Balance.from_json(split)
            splits[key] = split
        except ValueError as e:
            problems.append(f"splits[{_short(key)}]: {e}")
    return samples, splits, problems


def _sample(run) -> Sample | None:
    """A stored run: [tok/s, time] (a bare tok/s number: a file from before runs had times, too old to use)."""
    def number(x):
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
    if number(run):
        tps, t = run, 0.0
    elif isinstance(run, list) and len(run) == 2 and all(map(number, run)):
        tps, t = run
    else:
        return None
    return (float(tps), float(t)) if tps > 0 else None


def _short(key) -> str:
    text = repr(key)
    return text if len(text) <= 60 else text[:57] + "...'"


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def read_calibration(target: Path) -> tuple[dict, dict, list[str]] | None:
    """The file's (samples, splits, problems), None where there is none. Only a regular file is opened, and without
    waiting (should it have become a FIFO since it was looked at); anything else raises Unusable."""
    try:
        st = os.stat(target)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise Unusable(f"cannot be looked at ({e.strerror or e})") from None
    if not stat.S_ISREG(st.st_mode):
        raise Unusable(f"is {_kind(st.st_mode)}, not a regular file")
    try:
        fd = os.open(target, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise Unusable(f"cannot be read ({e.strerror or e})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Unusable(f"is {_kind(st.st_mode)}, not a regular file")
        if st.st_size > MAX_FILE_BYTES:
            raise Unusable(f"has {st.st_size} bytes, far more than a calibration file")
        chunks, size = [], 0
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_FILE_BYTES:
                raise Unusable(f"has more than {MAX_FILE_BYTES} bytes, far more than a calibration file")
    except OSError as e:
        raise Unusable(f"cannot be read ({e.strerror or e})") from None
    finally:
        os.close(fd)
    try:
        doc = json.loads(b"".join(chunks).decode("utf-8"))
    except (ValueError, RecursionError):    # not UTF-8, not JSON, nested too deep
        return {}, {}, ["it is not JSON"]
    return parse_calibration(doc)


@contextlib.contextmanager
def _file_lock(path: Path, timeout: float):
    """An exclusive flock on path (a side file, created if need be; never a FIFO or device: O_NOFOLLOW, checked),
    waited for at most timeout seconds: yields whether it was taken. OSError where it cannot be opened."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NONBLOCK | os.O_NOCTTY | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, f"the lock file {path} is not a regular file")
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    yield False
                    return
                time.sleep(0.005)
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


class Calibration:
    """Prefill throughput (tok/s) measured per calibration_key() and path, each run with its time, kept in a JSON file
    so that a setting is calibrated once per machine (and re-checked as decide_from_measurements says). The file is
    $PYTURBO_CALIBRATION, or ~/.cache/pyturbo/calibration.json; PYTURBO_CALIBRATION=off keeps it in memory only.
    It also keeps the layer splits that tensor_split="auto" measured (pyturbo.balance). Entries name the model file's
    size and mtime and the native library's build, so a changed model or a rebuild starts afresh; `clear()` (or
    deleting the file) forgets all.

    The file is data from outside: entries of the wrong shape are ignored with a warning (and measured again); a path
    that is not a regular file (a device, a FIFO, a directory) is never opened for reading, written or replaced: the
    runs stay in memory. Writes merge with what other processes wrote meanwhile, under a lock on a side file
    (<file>.lock), and replace the file atomically; a write that fails leaves no temporary file. Warnings go to the
    "pyturbo" logger, once per problem. Thread-safe."""

    def __init__(self, path: Path | None):
        self.path = path
        self.samples: dict[str, dict[str, list[Sample]]] = {}
        self.splits: dict[str, dict] = {}     # balance.Balance.to_json() per balance.balance_key()
        self._own_splits: set[str] = set()    # stored by this process: they win a merge
        self._loaded = False
        self._dirty = False                   # runs recorded since the last write
        self._saved_at = float("-inf")        # time.monotonic() of the last write
        self._flush_registered = False
        self._unusable: str | None = None     # why the file is neither read nor written (memory only)
        self._warned: set[str] = set()
        self._lock = threading.RLock()

    @classmethod
    def from_env(cls, env: dict) -> "Calibration":
        return cls(settings.read("PYTURBO_CALIBRATION", env))

    def runs(self, key: str, now: float | None = None) -> dict[str, list[Sample]]:
        """The runs for key that a decision may use (current(); now: time.time() unless given), as a snapshot: what a
        decision was made from stays as it was when later runs are recorded."""
        with self._lock:
            self._load()
            return current(self.samples.get(key, {}), time.time() if now is None else now)

    def measured(self, key: str, now: float | None = None) -> dict[str, list[float]]:
        """runs() as tok/s only, paths without runs left out."""
        return {path: [tps for tps, _ in runs] for path, runs in self.runs(key, now).items() if runs}

    def record(self, key: str, path: str, tokens_per_second: float, now: float | None = None) -> None:
        """Add a run (now: its time.time(), unless given). Written at once while its path is still being calibrated
        or when it made earlier runs of the setting void (a later process must see that); otherwise at most every
        SAVE_INTERVAL_S (and at exit). Ignored inside shared_devices(): that run did not measure the path alone."""
        if path not in PATHS or not (math.isfinite(tokens_per_second) and tokens_per_second > 0) or devices_shared():
            return   # nothing a decision could use
        with self._lock:
            self._load()
            now = time.time() if now is None else now
            before = {p: list(self.samples.get(key, {}).get(p, ())) for p in PATHS}
            runs = current({**before, path: before[path] + [(round(float(tokens_per_second), 1), round(now, 6))]}, now)
            self.samples[key] = {p: r for p, r in runs.items() if r}
            # fewer runs than before (plus this one, up to the cap): a change or age made some void
            voided = any(len(runs[p]) < min(len(before[p]) + (p == path), KEEP_SAMPLES) for p in PATHS)
            if len(before[path]) < SAMPLES_PER_PATH or voided or time.monotonic() - self._saved_at >= SAVE_INTERVAL_S:
                self._save()
            else:
                self._mark_dirty()

    def flush(self) -> None:
        """Write runs not written yet."""
        with self._lock:
            if self._dirty:
                self._save()

    def stored_split(self, key: str) -> dict | None:
        """The layer split stored for key (balance.balance_key), as balance.Balance.to_json() made it (checked by
        Balance.from_json when read), or None."""
        with self._lock:
            self._load()
            split = self.splits.get(key)
            return None if split is None else dict(split)

    def store_split(self, key: str, split: dict) -> None:
        with self._lock:
            self._load()
            self.splits[key] = split
            self._own_splits.add(key)
            self._save()

    def clear(self) -> None:
        """Forget every run and split, here and in the file (deleted; only ever a regular file)."""
        with self._lock:
            self.samples, self.splits, self._own_splits = {}, {}, set()
            self._loaded, self._dirty = True, False
            if self.path is None or self._unusable:
                return
            target = self._target()
            try:
                mode = os.stat(target).st_mode
                if not stat.S_ISREG(mode):   # before the lock file is made beside it (/dev/null.lock)
                    self._give_up_file(f"is {_kind(mode)}, not a regular file")
                    return
                with _file_lock(target.with_name(target.name + ".lock"), LOCK_TIMEOUT_S):
                    if stat.S_ISREG(os.stat(target).st_mode):
                        target.unlink()
            except FileNotFoundError:
                pass
            except OSError as e:
                self._warn(f"pyturbo: cannot delete the calibration file {self.path} ({e.strerror or e})")

    # ---- the file -----------------------------------------------------------------------------------------------

    def _target(self) -> Path:
        """The file written: where a symlink points (replacing the link would cut it)."""
        return Path(os.path.realpath(self.path))

    def _warn(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            log.warning("%s", message)

    def _problems(self, problems: list[str]) -> None:
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        self._warn(f"pyturbo: the calibration file {self.path} has entries of the wrong shape ({shown}): they are "
                   "ignored and measured again (the file is rewritten without them)")

    def _give_up_file(self, why: str) -> None:
        self._unusable = why
        self._warn(f"pyturbo: the calibration file {self.path} {why}: it is neither read nor written, and the "
                   "measurements stay in this process's memory (PYTURBO_CALIBRATION=off does that without a warning)")

    def _mark_dirty(self) -> None:
        self._dirty = True
        if not self._flush_registered:
            self._flush_registered = True
            atexit.register(self.flush)

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        if self.path is None:
            return
        try:
            read = read_calibration(self._target())
        except Unusable as e:
            self._give_up_file(str(e))
            return
        if read is not None:
            self.samples, self.splits, problems = read
            if problems:
                self._problems(problems)

    def _merge(self, samples: dict, splits: dict) -> None:
        """Take in what the file holds now (other processes' runs and splits): runs are united per key and path (then
        current() again), splits this process stored win, others' are taken."""
        now = time.time()
        merged = {}
        for key in self.samples.keys() | samples.keys():
            mine, theirs = self.samples.get(key, {}), samples.get(key, {})
            union = {}
            for p in PATHS:   # by time; runs of the same time keep their order (this process's first)
                ours = list(mine.get(p, ()))
                union[p] = sorted(ours + [r for r in theirs.get(p, ()) if r not in ours], key=lambda r: r[1])
            runs = current(union, now)
            if any(runs.values()):
                merged[key] = {p: r for p, r in runs.items() if r}
        self.samples = merged
        self.splits = {**self.splits, **splits, **{k: self.splits[k] for k in self._own_splits if k in self.splits}}

    def _save(self) -> None:
        self._dirty, self._saved_at = False, time.monotonic()
        if self.path is None or self._unusable:
            return
        target = self._target()
        tmp = None
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with _file_lock(target.with_name(target.name + ".lock"), LOCK_TIMEOUT_S) as locked:
                if not locked:
                    self._mark_dirty()   # tried again at the next write or at exit
                    self._warn(f"pyturbo: the calibration file {self.path} was locked by another process for "
                               f"{LOCK_TIMEOUT_S:.0f} s: its write is postponed")
                    return
                try:
                    read = read_calibration(target)
                except Unusable as e:
                    self._give_up_file(str(e))
                    return
                if read is not None:
                    samples, splits, problems = read
                    if problems:
                        self._problems(problems)
                    self._merge(samples, splits)
                    if not os.access(target, os.W_OK):
                        self._give_up_file("is not writable")
                        return
                fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
                with os.fdopen(fd, "w") as f:
                    json.dump({"version": 2, "samples": self.samples, "splits": self.splits}, f, indent=1)
                os.chmod(tmp, 0o644)
                os.replace(tmp, target)   # atomic: a concurrent reader sees the old file or the new one
                tmp = None
        except OSError as e:
            # a read-only home must not fail prefills: the runs stay in memory, and a later write tries again
            self._mark_dirty()
            self._warn(f"pyturbo: cannot write the calibration file {self.path} ({e.strerror or e}): the "
                       "measurements stay in memory")
        finally:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)


_calibration: Calibration | None = None


def calibration() -> Calibration:
    """The process's Calibration (its file is chosen from the environment once, on first use)."""
    global _calibration
    if _calibration is None:
        _calibration = Calibration.from_env(os.environ)
    return _calibration


@contextlib.contextmanager
def calibration_scope(cal: Calibration):
    """calibration() is cal within (one thread at a time: it is the process's): a benchmark measures with its own,
    never with what was stored under other conditions, and keeps its reference runs out of auto's."""
    global _calibration
    before, _calibration = _calibration, cal
    try:
        yield cal
    finally:
        _calibration = before

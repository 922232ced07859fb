"""Shaped network links on one machine: RPC workers behind links of a given rate, as if on other hosts (root only).

    from pyturbo.tools import links
    with links.Links(3, rate=50, model="per-worker", threads=1) as net:   # Mbit/s; rate=None: the same path unshaped
        with pyturbo.Model(path, rpc_servers=net.endpoints, tensor_split="even") as model:
            before = net.coordinator_bytes()
            ...                                                             # prefills
            moved = net.coordinator_bytes() - before                        # bytes through the coordinator's link

The topology, built with network namespaces and veth pairs (`ip` and `tc` of iproute2; names start with `ptl`, the
creating process's id and a letter, so that leftovers of a run that was killed are recognised and removed):

    root namespace (this process:       "switch" namespace              worker namespace i
    the coordinator)
    ptl<tag>c 10.77.0.1/24 ====veth==== c --+
                                            br0 (bridge) -- w<i> ====veth==== eth0 10.77.0.<10+i>/24
                                                                              python -m pyturbo.worker --host 10.77.0.<10+i>

Traffic between two workers crosses the bridge only, never the coordinator's interface, exactly as between hosts on
one switch; the coordinator's bytes are counted on its interface (`coordinator_bytes()`).

Link models (htb, rate in Mbit/s = 10^6 bit/s, on the egress of both ends of a veth, so each direction gets the rate):
- "coordinator": one link at the coordinator shared by all workers (its veth in the root namespace, coordinator ->
  workers, and the veth's peer in the switch namespace, workers -> coordinator). Worker-to-worker traffic is not
  shaped.
- "per-worker": each worker's own link (its eth0, worker -> anything, and the peer w<i>, anything -> worker): every
  transfer to, from or between workers crosses one (coordinator <-> worker) or two (worker <-> worker) such links.
`delay_ms` adds a one-way delay (netem) on every shaped egress; rate=None keeps the topology and shapes nothing (the
baseline to compare a shaped run with: the same path, the same processes).

Workers listen on addresses of the namespaces, not on loopback. Only processes of this machine can reach them (as
with loopback), and `python -m pyturbo.worker` refuses a non-loopback address without a shared secret, so it is
started with --allow-unauthenticated unless a secret is given (`token=`, or PYTURBO_RPC_TOKEN in the environment,
which the workers inherit). `env` and `extra_args` go to every worker.
"""
from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, NamedTuple, Sequence

from ..rpc_auth import RPC_TOKEN_ENV, resolve_rpc_token
from .workers import WorkerPool

PREFIX = "ptl"                                  # every name this module creates starts with it
DEFAULT_SUBNETS = "10.77.{}.0/24"               # the first of these no route of the root namespace overlaps
COORDINATOR_HOST, FIRST_WORKER_HOST = 1, 10     # .1 the coordinator, .10, .11, ... the workers
MODELS = ("coordinator", "per-worker")
LOCK_PATH = Path("/run/pyturbo-links.lock")     # one harness at a time chooses names and subnets, and cleans up
IP_TIMEOUT = 20.0                               # seconds for one ip/tc command
NETNS_DIR = Path("/run/netns")

_NAME = re.compile(rf"^{PREFIX}(\d+)([a-z])(c|-s|-w\d+)$")
_live_tags: set[str] = set()                    # tags of this process's harnesses that are up
_tag_lock = threading.Lock()
_next_letter = [0]


class LinksError(RuntimeError):
    """The shaped network could not be built (or taken down); the message says which command failed and why."""


class LinkBytes(NamedTuple):
    """Bytes through the coordinator's interface: sent (coordinator -> workers) and received."""
    sent: int
    received: int

    @property
    def total(self) -> int:
        return self.sent + self.received

    def __sub__(self, other: "LinkBytes") -> "LinkBytes":
        return LinkBytes(self.sent - other.sent, self.received - other.received)


def _bin(tool: str) -> str:
    """Where ip or tc is (also in the sbin folders, which a PATH may lack)."""
    return shutil.which(tool) or next((f"{d}/{tool}" for d in ("/usr/sbin", "/sbin") if os.access(f"{d}/{tool}", os.X_OK)),
                                      tool)


def _run(cmd: Sequence[str], check: bool = True) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run([_bin(cmd[0]), *cmd[1:]], capture_output=True, text=True, timeout=IP_TIMEOUT,
                              stdin=subprocess.DEVNULL)
    except FileNotFoundError as e:
        raise LinksError(f"`{cmd[0]}` is not installed (iproute2 provides ip and tc)") from e
    except subprocess.TimeoutExpired as e:
        raise LinksError(f"`{' '.join(cmd)}` did not finish within {IP_TIMEOUT:.0f} s") from e
    if check and proc.returncode != 0:
        raise LinksError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def _tc(ns: list[str]) -> list[str]:
    """tc, in namespace ns[0] (or the root one for [])."""
    return ["tc", *(["-n", ns[0]] if ns else [])]


@contextlib.contextmanager
def _global_lock():
    """Held while names and subnets are chosen and leftovers removed (several harnesses, even in other processes)."""
    fd = os.open(LOCK_PATH, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise LinksError(f"{LOCK_PATH} stayed locked for 60 s (another harness setting up?)") from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _new_tag() -> str:
    """pid + a letter: unique among live harnesses (the pid is alive while its names are in use)."""
    with _tag_lock:
        for _ in range(26):
            letter = chr(ord("a") + _next_letter[0] % 26)
            _next_letter[0] += 1
            tag = f"{os.getpid()}{letter}"
            if tag not in _live_tags:
                _live_tags.add(tag)
                return tag
    raise LinksError("26 harnesses are up in this process: close one first")


def _our_names() -> tuple[list[str], list[str]]:
    """(namespaces, root-namespace interfaces) whose names this module made."""
    spaces = sorted(p.name for p in NETNS_DIR.iterdir() if _NAME.match(p.name)) if NETNS_DIR.is_dir() else []
    ifaces = sorted(p.name for p in Path("/sys/class/net").iterdir() if _NAME.match(p.name))
    return spaces, ifaces


def _is_leftover(name: str) -> bool:
    m = _NAME.match(name)
    if not m:
        return False
    pid, tag = int(m.group(1)), m.group(1) + m.group(2)
    if pid == os.getpid():
        return tag not in _live_tags
    return not _pid_alive(pid)


def _remove(spaces: Sequence[str], ifaces: Sequence[str]) -> list[str]:
    """Delete these namespaces and root interfaces; a worker still running in one of them is killed (by pid, only
    if it is a pyturbo worker). Returns what could not be removed, with the reason."""
    problems = []
    for ns in spaces:
        pids = _run(["ip", "netns", "pids", ns], check=False).stdout.split()
        for pid in map(int, pids):
            with contextlib.suppress(OSError):
                if b"pyturbo.worker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(pid, signal.SIGKILL)
    for iface in ifaces:   # deleting one end of a veth deletes both
        proc = _run(["ip", "link", "del", iface], check=False)
        if proc.returncode != 0 and Path(f"/sys/class/net/{iface}").exists():
            problems.append(f"interface {iface}: {proc.stderr.strip()}")
    for ns in spaces:
        proc = _run(["ip", "netns", "del", ns], check=False)
        if proc.returncode != 0 and (NETNS_DIR / ns).exists():
            problems.append(f"namespace {ns}: {proc.stderr.strip()}")
    # a veth whose peer's namespace went away is deleted by the kernel shortly after: wait for it (bounded)
    deadline = time.monotonic() + 5
    while any(Path(f"/sys/class/net/{i}").exists() for i in ifaces) and time.monotonic() < deadline:
        time.sleep(0.02)
    problems += [f"interface {i} is still there" for i in ifaces if Path(f"/sys/class/net/{i}").exists()]
    return problems


def cleanup_leftovers() -> list[str]:
    """Remove the namespaces and interfaces of harnesses whose process is gone (a crashed or killed run); returns
    their names. Those of live harnesses, in this process or another, are left alone."""
    with _global_lock():
        return _cleanup_leftovers_locked()


def _cleanup_leftovers_locked() -> list[str]:
    spaces, ifaces = _our_names()
    spaces, ifaces = [n for n in spaces if _is_leftover(n)], [n for n in ifaces if _is_leftover(n)]
    if spaces or ifaces:
        problems = _remove(spaces, ifaces)
        if problems:
            raise LinksError("could not remove leftovers of an earlier run: " + "; ".join(problems))
    return spaces + ifaces


_available: str | None = None


def unavailable_reason() -> str:
    """"" when this machine can run the harness (root, ip and tc of iproute2, network namespaces, veth, bridge, htb),
    else why not; found by building and removing a two-namespace probe once per process."""
    global _available
    if _available is None:
        _available = _probe()
    return _available


def available() -> bool:
    return not unavailable_reason()


def _probe() -> str:
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces and tc need root"
    missing = [tool for tool in ("ip", "tc") if not os.path.isabs(_bin(tool))]
    if missing:
        return f"{' and '.join(missing)} not found: install iproute2 (apt-get install iproute2)"
    try:
        with Links(0, rate=100, model="coordinator", workers=False):
            pass
    except (LinksError, OSError) as e:
        return f"cannot build network namespaces with veth, bridge and htb here: {e}"
    return ""


def require() -> None:
    """LinksError saying why, when the harness cannot run on this machine."""
    why = unavailable_reason()
    if why:
        raise LinksError(why)


def _netem(cmd: list[str]) -> None:
    try:
        _run(cmd)
    except LinksError as e:
        if "unknown" in str(e):
            raise LinksError("delay_ms needs netem (the kernel's sch_netem module), which this kernel lacks") from e
        raise


_delay_available: str | None = None


def delay_unavailable_reason() -> str:
    """"" when delay_ms can be used (netem), else why not (probed once per process)."""
    global _delay_available
    if _delay_available is None:
        _delay_available = unavailable_reason()
        if not _delay_available:
            try:
                with Links(0, rate=100, delay_ms=1, workers=False):
                    pass
            except (LinksError, OSError) as e:
                _delay_available = str(e)
    return _delay_available


@dataclass(frozen=True)
class Shaping:
    model: str                   # "coordinator" or "per-worker"
    rate: float | None           # Mbit/s (10^6 bit/s) each way; None: not shaped
    delay_ms: float = 0.0        # one way, per shaped egress

    def describe(self) -> str:
        if self.rate is None and not self.delay_ms:
            return "unshaped (same namespaces and bridge)"
        what = f"{self.rate:g} Mbit/s each way" if self.rate is not None else "no rate limit"
        where = ("one link at the coordinator, shared by all workers" if self.model == "coordinator"
                 else "a link per worker")
        return f"{what}{f', +{self.delay_ms:g} ms one way' if self.delay_ms else ''}: {where}"


class Links:
    """n RPC workers, each in a network namespace behind a shaped link (see the module's text); a context manager.
    close() (or the end of the with block, whatever happened in it) stops the workers and removes every namespace
    and interface it made; so does dropping the object or the end of the process, and the next harness removes what
    a killed process left.

    rate: Mbit/s each way, or None (unshaped); model: "coordinator" or "per-worker"; delay_ms: one-way delay per
    shaped egress; subnet: an IPv4 /24 ... /29 (default: the first 10.77.X.0/24 no route here overlaps);
    threads, device, start_timeout: of each worker (WorkerPool); token: the workers' shared secret (PYTURBO_RPC_TOKEN;
    pass the same to Model(rpc_token=)); env, extra_args: for every worker; workers=False builds the network only.
    """

    def __init__(self, n: int, rate: float | None = None, model: str = "coordinator", *, delay_ms: float = 0.0,
                 subnet: str | None = None, threads: int = 1, device: str = "", start_timeout: float = 60.0,
                 token: str | None = None, env: Mapping[str, str] | None = None, extra_args: Sequence[str] = (),
                 workers: bool = True, log_dir: str | os.PathLike | None = None):
        if not isinstance(n, int) or n < 0 or n > 200:
            raise ValueError(f"n must be a number of workers from 0 to 200, not {n!r}")
        if model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, not {model!r}")
        if rate is not None and not (isinstance(rate, (int, float)) and 0 < rate < 1e6):
            raise ValueError(f"rate is in Mbit/s and must be > 0 (None: unshaped), not {rate!r}")
        if not (isinstance(delay_ms, (int, float)) and 0 <= delay_ms <= 10000):
            raise ValueError(f"delay_ms must be from 0 to 10000, not {delay_ms!r}")
        self.n, self.shaping = n, Shaping(model, None if rate is None else float(rate), float(delay_ms))
        self.token = token
        self.pool: WorkerPool | None = None
        self.tag = _new_tag()
        self.switch_ns = f"{PREFIX}{self.tag}-s"
        self.worker_ns = [f"{PREFIX}{self.tag}-w{i}" for i in range(n)]
        self.interface = f"{PREFIX}{self.tag}c"          # the coordinator's, in the root namespace
        self._closed = False
        self._finalizer = weakref.finalize(self, _teardown, None, [self.switch_ns, *self.worker_ns], [self.interface],
                                           self.tag)
        try:
            with _global_lock():
                _cleanup_leftovers_locked()
                self.subnet = self._choose_subnet(subnet)
                hosts = list(self.subnet.hosts())
                if FIRST_WORKER_HOST + n > len(hosts):
                    raise ValueError(f"subnet {self.subnet} has no room for {n} workers")
                self.coordinator_address = str(hosts[COORDINATOR_HOST - 1])
                self.worker_addresses = [str(hosts[FIRST_WORKER_HOST - 1 + i]) for i in range(n)]
                self._build()
            if workers and n:
                self._start_workers(threads, device, start_timeout, token, env, extra_args, log_dir)
        except BaseException:
            self.close(raise_errors=False)
            raise

    # ---- the network

    def _choose_subnet(self, subnet: str | None) -> ipaddress.IPv4Network:
        taken = self._routes()
        if subnet is not None:
            net = ipaddress.ip_network(subnet, strict=False)
            if not isinstance(net, ipaddress.IPv4Network) or not 24 <= net.prefixlen <= 29:
                raise ValueError(f"subnet must be an IPv4 network from /24 to /29, not {subnet!r}")
            clash = [str(t) for t in taken if t.overlaps(net)]
            if clash:
                raise LinksError(f"subnet {net} overlaps routes of this machine ({', '.join(clash)}): pass another "
                                 "subnet=")
            return net
        for x in range(256):
            net = ipaddress.ip_network(DEFAULT_SUBNETS.format(x))
            if not any(t.overlaps(net) for t in taken):
                return net
        raise LinksError(f"every subnet {DEFAULT_SUBNETS.format('X')} overlaps a route of this machine: pass subnet=")

    @staticmethod
    def _routes() -> list[ipaddress.IPv4Network]:
        out = _run(["ip", "-j", "-4", "route", "show", "table", "all"]).stdout
        nets = []
        for r in json.loads(out or "[]"):
            dst = r.get("dst", "")
            if dst and dst != "default" and r.get("type", "unicast") in ("unicast", "local"):
                with contextlib.suppress(ValueError):
                    nets.append(ipaddress.ip_network(dst, strict=False))
        return nets

    def _build(self) -> None:
        sw, prefixlen = self.switch_ns, self.subnet.prefixlen
        ip_sw = ["ip", "-n", sw]
        _run(["ip", "netns", "add", sw])
        _run([*ip_sw, "link", "add", "br0", "type", "bridge", "forward_delay", "0"])
        _run([*ip_sw, "link", "set", "br0", "addrgenmode", "none"])   # no IPv6 chatter on the counted links
        _run([*ip_sw, "link", "set", "br0", "up"])
        # the coordinator's link: one end here (root namespace), the other a port of the bridge
        _run(["ip", "link", "add", self.interface, "type", "veth", "peer", "name", "c", "netns", sw])
        _run(["ip", "link", "set", self.interface, "addrgenmode", "none"])
        _run(["ip", "addr", "add", f"{self.coordinator_address}/{prefixlen}", "dev", self.interface])
        _run([*ip_sw, "link", "set", "c", "addrgenmode", "none"])
        _run([*ip_sw, "link", "set", "c", "master", "br0", "up"])
        _run(["ip", "link", "set", self.interface, "up"])
        for i, ns in enumerate(self.worker_ns):
            ip_w = ["ip", "-n", ns]
            _run(["ip", "netns", "add", ns])
            _run([*ip_w, "link", "set", "lo", "up"])
            _run([*ip_sw, "link", "add", f"w{i}", "type", "veth", "peer", "name", "eth0", "netns", ns])
            _run([*ip_sw, "link", "set", f"w{i}", "addrgenmode", "none"])
            _run([*ip_sw, "link", "set", f"w{i}", "master", "br0", "up"])
            _run([*ip_w, "link", "set", "eth0", "addrgenmode", "none"])
            _run([*ip_w, "addr", "add", f"{self.worker_addresses[i]}/{prefixlen}", "dev", "eth0"])
            _run([*ip_w, "link", "set", "eth0", "up"])
        for ns, dev in self._shaped_egresses():
            self._shape(ns, dev)

    def _shaped_egresses(self) -> list[tuple[list[str], str]]:
        """(namespace or [] for the root one, device) of every egress the link model shapes."""
        if self.shaping.model == "coordinator":
            return [([], self.interface), ([self.switch_ns], "c")]
        return [e for i, ns in enumerate(self.worker_ns) for e in (([ns], "eth0"), ([self.switch_ns], f"w{i}"))]

    def set_rate(self, rate: float | None) -> None:
        """Shape the same links at another rate (None: unshaped), with the workers and their connections as they are:
        runs at several rates can then interleave in the same processes, so that what drifts over time on a busy
        machine (another process, the CPU's clock) weighs on each rate alike."""
        self.shaping = Shaping(self.shaping.model, None if rate is None else float(rate), self.shaping.delay_ms)
        for ns, dev in self._shaped_egresses():
            _run([*_tc(ns), "qdisc", "del", "dev", dev, "root"], check=False)
            self._shape(ns, dev)

    def _shape(self, ns: list[str], dev: str) -> None:
        """Egress of dev (in namespace ns[0], or the root one): htb at the rate, netem for the delay."""
        tc = [*_tc(ns), "qdisc", "add", "dev", dev]
        rate, delay = self.shaping.rate, self.shaping.delay_ms
        netem = ["netem", "delay", f"{delay:g}ms", "limit", "10000"]
        if rate is None:
            if delay:
                _netem([*tc, "root", "handle", "1:", *netem])
            return
        bits = f"{round(rate * 1e6)}bit"
        _run([*tc, "root", "handle", "1:", "htb", "default", "1"])
        _run([*_tc(ns), "class", "add", "dev", dev, "parent", "1:", "classid", "1:1", "htb", "rate", bits,
              "ceil", bits])
        if delay:
            _netem([*tc, "parent", "1:1", "handle", "10:", *netem])

    # ---- the workers

    def exec_prefix(self, i: int) -> list[str]:
        """The command prefix that runs a program in worker i's namespace (it replaces itself by the program)."""
        return [_bin("ip"), "netns", "exec", self.worker_ns[i]]

    def _start_workers(self, threads, device, start_timeout, token, env, extra_args, log_dir) -> None:
        env = dict(env or {})
        if token is not None:
            env[RPC_TOKEN_ENV] = token
        args = list(extra_args)
        has_secret = bool(env.get(RPC_TOKEN_ENV) or resolve_rpc_token())
        # only processes of this machine reach these addresses, as with loopback
        if not has_secret and "--allow-unauthenticated" not in args:
            args.append("--allow-unauthenticated")
        self.pool = WorkerPool(self.n, threads=threads, device=device, start_timeout=start_timeout, log_dir=log_dir,
                               host=self.worker_addresses, prefix=[self.exec_prefix(i) for i in range(self.n)],
                               env=env, extra_args=args)
        self._finalizer.detach()
        self._finalizer = weakref.finalize(self, _teardown, self.pool, [self.switch_ns, *self.worker_ns],
                                           [self.interface], self.tag)

    @property
    def endpoints(self) -> list[str]:
        """host:port of each worker, for Model(rpc_servers=...)."""
        if self.pool is None:
            raise LinksError("this harness was built without workers (workers=False)")
        return self.pool.endpoints

    # ---- counters

    def coordinator_bytes(self) -> LinkBytes:
        """Bytes the coordinator's interface has sent and received since it was made (IP packets with their
        headers, as a NIC counts them)."""
        stats = Path("/sys/class/net") / self.interface / "statistics"
        try:
            return LinkBytes(int((stats / "tx_bytes").read_text()), int((stats / "rx_bytes").read_text()))
        except OSError:
            data = json.loads(_run(["ip", "-j", "-s", "link", "show", "dev", self.interface]).stdout)[0]
            return LinkBytes(data["stats64"]["tx"]["bytes"], data["stats64"]["rx"]["bytes"])

    def worker_bytes(self, i: int) -> LinkBytes:
        """Bytes worker i's interface has sent and received (all its traffic: with the coordinator and other
        workers)."""
        data = json.loads(_run(["ip", "-n", self.worker_ns[i], "-j", "-s", "link", "show", "dev", "eth0"]).stdout)[0]
        return LinkBytes(data["stats64"]["tx"]["bytes"], data["stats64"]["rx"]["bytes"])

    def describe(self) -> dict:
        return {"model": self.shaping.model, "rate_mbit": self.shaping.rate, "delay_ms": self.shaping.delay_ms,
                "text": self.shaping.describe(), "subnet": str(self.subnet), "coordinator": self.coordinator_address,
                "workers": self.worker_addresses}

    # ---- the end

    def close(self, raise_errors: bool = True) -> None:
        """Stop the workers, remove the namespaces and interfaces; LinksError (after removing what it could) if
        some remain."""
        if self._closed:
            return
        self._closed = True
        self._finalizer.detach()
        problems = _teardown(self.pool, [self.switch_ns, *self.worker_ns], [self.interface], self.tag)
        if problems and raise_errors:
            raise LinksError("teardown left: " + "; ".join(problems))
        if problems:
            warnings.warn("pyturbo.links teardown left: " + "; ".join(problems), RuntimeWarning, stacklevel=2)

    def __enter__(self) -> "Links":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(raise_errors=exc_type is None)   # never hide the error that ended the block


def _teardown(pool: WorkerPool | None, spaces: list[str], ifaces: list[str], tag: str) -> list[str]:
    try:
        if pool is not None:
            pool.stop()
        with _global_lock():
            return _remove([s for s in spaces if (NETNS_DIR / s).exists()], ifaces)
    finally:
        _live_tags.discard(tag)


__all__ = ["Links", "LinkBytes", "LinksError", "Shaping", "MODELS", "available", "unavailable_reason",
           "delay_unavailable_reason",
           "require", "cleanup_leftovers"]

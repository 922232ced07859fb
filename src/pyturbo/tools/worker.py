"""`python -m pyturbo.worker`: a llama.cpp RPC worker (one device of a layer split) on this host.

llama.cpp's RPC protocol has no authentication or encryption of its own: anyone who can connect can run graph
operations and read or write the worker's memory. With a shared secret in $PYTURBO_RPC_TOKEN (the same as the
coordinator's) the worker serves only clients that prove they know it (patches/0010; the secret never crosses the
network, but the traffic is not encrypted: use a private network or a tunnel). It binds to 127.0.0.1 unless told
otherwise, and refuses any other address without a secret unless --allow-unauthenticated says so.
"""
from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys
import threading
import time

from .. import _native
from ..devices import MAX_THREADS, usable_cpu_cores
from ..rpc_auth import RPC_TOKEN_ENV, resolve_rpc_token


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _exit_with_parent(parent_pid: int) -> None:
    """Workers started by pyturbo.workers.local() must not outlive it, even if it is killed."""
    while True:
        if os.getppid() != parent_pid:
            os._exit(0)
        time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pyturbo.worker", description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, required=True,
                    help="TCP port to listen on; 0: any free port. Once listening, the worker prints "
                         "'listening on HOST:PORT' as the first line of its output")
    ap.add_argument("--host", default="127.0.0.1",
                    help=f"address to bind (default 127.0.0.1); any other needs a shared secret in ${RPC_TOKEN_ENV} "
                         "(or --allow-unauthenticated)")
    ap.add_argument("--allow-unauthenticated", action="store_true",
                    help=f"serve a non-loopback address without a secret: anyone who reaches the port can use this "
                         f"machine's device and memory (only on a network you trust completely)")
    ap.add_argument("--threads", type=int, default=min(usable_cpu_cores(), MAX_THREADS),
                    help="CPU threads for the computation")
    ap.add_argument("--device", default="", help="local device to serve (default: the CPU), e.g. CUDA0")
    ap.add_argument("--exit-with-parent", type=int, default=0, metavar="PID", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if not 0 <= args.port < 65536:
        ap.error(f"--port must be in 0..65535 (0: any free port), not {args.port}")
    if not 1 <= args.threads <= MAX_THREADS:
        ap.error(f"--threads must be from 1 to {MAX_THREADS}, not {args.threads}")
    try:
        token = resolve_rpc_token()
    except ValueError as e:
        ap.error(str(e))
    if not is_loopback(args.host) and not token:
        if not args.allow_unauthenticated:
            ap.error(f"refusing to serve {args.host} without a shared secret: anyone who reaches the port could use "
                     f"this machine's device and memory. Set {RPC_TOKEN_ENV} (the same value on the coordinator), or "
                     "pass --allow-unauthenticated on a network you trust completely")
        print(f"WARNING: serving llama.cpp RPC on {args.host}:{args.port} without a shared secret: anyone who can "
              "reach this port can use this machine's device and memory.", file=sys.stderr, flush=True)
    if args.exit_with_parent:
        threading.Thread(target=_exit_with_parent, args=(args.exit_with_parent,), daemon=True).start()

    os.environ.setdefault("PYTURBO_GPU_STREAMS", "1")  # a worker serves its GPU as the one device it is
    lib, ffi = _native.lib(), _native.ffi()
    if args.device:
        names = [ffi.string(lib.pt_device_name(i)).decode() for i in range(lib.pt_device_count())]
        if args.device not in names:
            ap.error(f"--device {args.device!r} is not a device of this host; there are: {', '.join(names)}")
    lib.pt_rpc_set_secret(token.encode())
    # bind here, before serving: a failure is reported (and the exit code says so), and --port 0 learns its port
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((args.host, args.port))
        sock.listen(8)
    except OSError as e:
        sock.close()
        hint = {98: "another program listens there: pick another --port, or 0 for any free one"}.get(e.errno, "")
        print(f"error: cannot listen on {args.host}:{args.port}: {e.strerror or e}" + (f" ({hint})" if hint else ""),
              file=sys.stderr)
        return 1
    host, port = sock.getsockname()[:2]
    print(f"listening on {host}:{port}", flush=True)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # llama.cpp's own lines go to stderr: stdout said it all
    rc = lib.pt_rpc_serve_socket(sock.detach(), args.threads, args.device.encode())  # returns only on failure
    _native.drain_log()
    print(f"error: {ffi.string(lib.pt_last_error()).decode(errors='replace')} (code {rc})", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())

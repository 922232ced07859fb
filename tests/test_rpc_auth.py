"""Workers that let no one else in (patches/0010): with a shared secret a worker serves only clients that prove they
know it, by HMAC-SHA256 over nonces from both sides, and proves it in return. Raw-socket clients check the wire."""
from __future__ import annotations

import hashlib
import hmac
import os
import socket
import struct
import subprocess
import sys

import numpy as np
import pytest

import pyturbo
from pyturbo import workers

from conftest import prompt

SECRET = "correct horse battery staple"
# command numbers of the RPC protocol (ggml-rpc.cpp's rpc_cmd; AUTH_* added by patches/0010)
ALLOC_BUFFER, GRAPH_COMPUTE, HELLO, DEVICE_COUNT, AUTH_CHALLENGE, AUTH_PROVE = 0, 10, 14, 15, 18, 19
SERVER_ID, PEER_HELLO, PEER_DATA = 20, 24, 25   # server-to-server copies (patches/0011)
HELLO_AUTH, PEER_COPY = 0x01, 0x02             # flags of the HELLO answer
CAPS_SIZE = 24


def send_cmd(sock, cmd: int, payload: bytes = b"") -> None:
    sock.sendall(bytes([cmd]) + struct.pack("<Q", len(payload)) + payload)


def recv_exact(sock, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError(f"closed after {len(data)} of {n} bytes")
        data += chunk
    return data


def recv_msg(sock) -> bytes:
    (size,) = struct.unpack("<Q", recv_exact(sock, 8))
    return recv_exact(sock, size)


def closed_without_answer(sock) -> bool:
    """The server closed the connection and sent nothing first."""
    sock.settimeout(10)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def hello(port: int) -> tuple[socket.socket, int]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    send_cmd(sock, HELLO, bytes(CAPS_SIZE))
    rsp = recv_msg(sock)
    return sock, rsp[3]   # major, minor, patch, flags, caps


def proof(secret: str, role: bytes, server_nonce: bytes, client_nonce: bytes) -> bytes:
    return hmac.new(secret.encode(), role + b"\0" + server_nonce + client_nonce, hashlib.sha256).digest()


def authenticate_raw(sock, secret: str) -> tuple[int, bytes, bytes, bytes]:
    send_cmd(sock, AUTH_CHALLENGE)
    server_nonce = recv_msg(sock)
    client_nonce = os.urandom(32)
    send_cmd(sock, AUTH_PROVE, client_nonce + proof(secret, b"client", server_nonce, client_nonce))
    rsp = recv_msg(sock)
    return rsp[0], rsp[1:], server_nonce, client_nonce


@pytest.fixture(scope="module")
def guarded_worker():
    """One worker on loopback started with the secret (it inherits the environment)."""
    old = os.environ.get("PYTURBO_RPC_TOKEN")
    os.environ["PYTURBO_RPC_TOKEN"] = SECRET
    try:
        with workers.local(1, threads=1) as pool:
            os.environ.pop("PYTURBO_RPC_TOKEN")
            if old is not None:
                os.environ["PYTURBO_RPC_TOKEN"] = old
            yield pool
    finally:
        os.environ.pop("PYTURBO_RPC_TOKEN", None)
        if old is not None:
            os.environ["PYTURBO_RPC_TOKEN"] = old


def test_a_wrong_secret_is_refused_and_the_connection_closed(guarded_worker):
    sock, _ = hello(guarded_worker.ports[0])
    with sock:
        accepted, _, _, _ = authenticate_raw(sock, "not the secret")
        assert accepted == 0
        assert closed_without_answer(sock)


def test_models_with_the_wrong_or_no_secret_get_a_clear_error(guarded_worker, tiny_model):
    for token, says in (("wrong", "refused this process's shared secret"), ("", "requires a shared secret")):
        with pytest.raises(pyturbo.WorkerError, match=says):
            pyturbo.Model(tiny_model, rpc_servers=guarded_worker.endpoints, rpc_token=token)


def test_a_model_with_a_secret_refuses_a_worker_without_one(tiny_model):
    with workers.local(1, threads=1) as pool:
        with pytest.raises(pyturbo.WorkerError, match="does not ask for the shared secret"):
            pyturbo.Model(tiny_model, rpc_servers=pool.endpoints, rpc_token=SECRET)


def test_the_right_secret_gives_the_same_logits_as_no_secret(guarded_worker, tiny_model):
    tokens = prompt(96)
    with pyturbo.Model(tiny_model, rpc_servers=guarded_worker.endpoints, rpc_token=SECRET) as model, \
            model.context(n_ctx=256, n_ubatch=32, n_threads=1) as ctx:
        ctx.prefill(tokens, pipeline="off")
        guarded = ctx.logits().copy()
    with workers.local(1, threads=1) as pool, pyturbo.Model(tiny_model, rpc_servers=pool.endpoints) as model, \
            model.context(n_ctx=256, n_ubatch=32, n_threads=1) as ctx:
        ctx.prefill(tokens, pipeline="off")
        assert np.array_equal(ctx.logits(), guarded)


def test_a_worker_refuses_a_non_loopback_address_without_a_secret():
    env = {k: v for k, v in os.environ.items() if k != "PYTURBO_RPC_TOKEN"}
    proc = subprocess.run([sys.executable, "-m", "pyturbo.worker", "--host", "0.0.0.0", "--port", "0"],
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode != 0
    assert "without a shared secret" in proc.stderr and "PYTURBO_RPC_TOKEN" in proc.stderr
    assert "listening" not in proc.stdout


def peer_hello(port: int) -> tuple[socket.socket, int]:
    """Connect as another server would for a server-to-server copy (patches/0011)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    send_cmd(sock, PEER_HELLO, bytes(CAPS_SIZE))
    return sock, recv_msg(sock)[3]


# how a connection introduces itself: as a client (a coordinator), or as another server sending a server-to-server copy
CONNECT = {"client": hello, "peer": peer_hello}


@pytest.mark.parametrize("kind,command,payload", [
    ("client", ALLOC_BUFFER, struct.pack("<IQ", 0, 1 << 20)), ("client", DEVICE_COUNT, b""),
    ("client", GRAPH_COMPUTE, struct.pack("<II", 0, 0)),
    ("peer", PEER_DATA, struct.pack("<QI", 1, 0) + bytes(64)), ("peer", SERVER_ID, b"")])
def test_a_connection_without_the_secret_is_served_nothing(guarded_worker, kind, command, payload):
    sock, flags = CONNECT[kind](guarded_worker.ports[0])
    with sock:
        assert flags & HELLO_AUTH and (kind == "client" or flags & PEER_COPY)
        send_cmd(sock, command, payload)
        assert closed_without_answer(sock)


@pytest.mark.parametrize("kind,command,answer_size", [("client", DEVICE_COUNT, 4), ("peer", SERVER_ID, 8)])
def test_the_right_secret_is_served_and_the_worker_proves_it_knows_it_too(guarded_worker, kind, command, answer_size):
    sock, _ = CONNECT[kind](guarded_worker.ports[0])
    with sock:
        accepted, server_proof, server_nonce, client_nonce = authenticate_raw(sock, SECRET)
        assert accepted == 1
        assert hmac.compare_digest(server_proof, proof(SECRET, b"server", server_nonce, client_nonce))
        send_cmd(sock, command)
        answer = recv_msg(sock)
        assert len(answer) == answer_size and (command != DEVICE_COUNT or struct.unpack("<I", answer)[0] >= 1)


def test_workers_with_a_secret_copy_to_each_other(tiny_model, monkeypatch):
    """The pipeline's server-to-server copies between workers that require the secret: they authenticate to each other
    with it, and the result is the standard path's."""
    monkeypatch.setenv("PYTURBO_RPC_TOKEN", SECRET)
    with workers.local(2, threads=1) as pool, \
            pyturbo.Model(tiny_model, rpc_servers=pool.endpoints, tensor_split="even") as model, \
            model.context(n_ctx=512, n_ubatch=32, n_threads=1) as ctx:
        tokens = prompt(200)
        result = ctx.prefill(tokens, pipeline="force")
        pipelined = ctx.logits().copy()
        ctx.reset()
        ctx.prefill(tokens, pipeline="off")
        assert result.transfers == "server-to-server"
        assert np.array_equal(pipelined, ctx.logits())

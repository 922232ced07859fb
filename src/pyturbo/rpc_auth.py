"""The shared secret of a coordinator and its RPC workers (patches/0010): a worker started with one serves only
clients that prove they know it, and a coordinator with one connects only to workers that prove it in return. Used
by `Model`, `python -m pyturbo.worker` and the shaped-link harness."""
from __future__ import annotations

from . import settings

RPC_TOKEN_ENV = "PYTURBO_RPC_TOKEN"


def resolve_rpc_token(given: str | None = None) -> str:
    """The secret to use: the one given, else $PYTURBO_RPC_TOKEN, else "" (none)."""
    token = settings.read(RPC_TOKEN_ENV) if given is None else given
    if not isinstance(token, str) or "\0" in token:
        raise ValueError(f"the RPC token must be a string without NUL characters, not {type(token).__name__}")
    return token

"""The local set-up of the TTFT bench: a synthetic model, a server on its own local RPC workers, and the same
model in this process on as many other workers (the in-process reference)."""
from __future__ import annotations

import contextlib
import sys
import tempfile
from pathlib import Path

from ..model import Model
from ..server import launch
from . import synth, workers


# The default model: 6 layers (2 per worker of 3), narrow enough that a 32K-token prompt prefills in minutes on
# 2 cores (attention grows with the square of the length)
SHAPE = synth.ModelShape(n_layer=6, n_embd=256, n_ff=704, n_head=4, n_head_kv=2, n_vocab=8000)


@contextlib.contextmanager
def local_setup(args, max_len: int):
    """Yields (server URL, reference context, n_vocab)."""
    path = synth.cached_model(SHAPE if args.preset == "ttft" else args.preset, progress=True)
    n_ctx = max_len + 64
    sizes = ["--n-ctx", n_ctx, "--n-batch", args.batch, "--n-ubatch", args.ubatch, "--threads", args.threads]
    log_path = Path(tempfile.mkstemp(prefix="pyturbo-ttft-server-", suffix=".log")[1])
    print(f"server log: {log_path}", file=sys.stderr)
    with workers.local(args.workers, threads=args.threads) as server_pool, \
            workers.local(args.workers, threads=args.threads) as reference_pool:
        proc, url = launch.start(["--model", path, "--rpc", ",".join(server_pool.endpoints), "--tensor-split", "even",
                                  *sizes], log_path)
        try:
            launch.wait_healthy(url, proc, 300, log_path)
            with Model(path, rpc_servers=reference_pool.endpoints, tensor_split="even") as model, \
                    model.context(n_ctx=n_ctx, n_batch=args.batch, n_ubatch=args.ubatch, n_threads=args.threads) as ctx:
                yield url, ctx, model.n_vocab
        finally:
            launch.stop(proc)

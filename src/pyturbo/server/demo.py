"""`--demo`: a synthetic model with the tiny real vocabulary and a chat template, split over local RPC workers, so
the server runs on any machine without a download. Its weights are random: the answers are word salad."""
from __future__ import annotations

from ..tools import synth, workers

# 8 layers so that the split over two workers has something to pipeline; small enough to answer at once on 2 cores
SHAPE = synth.ModelShape(n_layer=8, n_embd=256, n_ff=704, n_head=8, n_head_kv=4, n_vocab=synth.tiny_vocab_size(),
                         n_ctx_train=8192, dtype="f16")


def model_path():
    """The demo model, written to the pyturbo cache the first time."""
    return synth.cached_model(SHAPE, vocab="tiny", chat_template=synth.TINY_CHAT_TEMPLATE)


def restart_workers(pool, n: int):
    """Stop the old local workers (if any) and start n fresh ones (one thread each) on free loopback ports."""
    if pool is not None:
        pool.stop()
    return workers.WorkerPool(n, threads=1)

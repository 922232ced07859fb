"""What a `Context` may be asked for: the options' values as llama.cpp and pyturbo take them, checked in one place
before anything is allocated (a ValueError naming the option)."""
from __future__ import annotations

from .devices import MAX_THREADS

FLASH_ATTN = {None: -1, "auto": -1, False: 0, True: 1}
MAX_N_CTX = 2**31 - 1  # llama.cpp counts positions in int32
MAX_SEQUENCES = 256    # LLAMA_MAX_SEQ


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# How the pipeline moves activations between RPC workers: "direct" (each worker sends its result to the next worker
# itself, patches/0011; through this process only where the workers cannot reach each other, and the result says why)
# or "relay" (always through this process, as llama.cpp does)
RPC_TRANSFERS = ("direct", "relay")
# The format of those direct copies (enum llama_turbo_wire): None sends the F32 activations as computed (bit-identical
# results); "f16" / "bf16" send half the bytes, rounded on the way (within RPC_WIRE_TOLERANCE)
RPC_WIRE = {None: 0, "f16": 1, "bf16": 2}


def check_context_options(*, n_ctx, n_batch, n_ubatch, n_threads, flash_attn, max_in_flight, first_ubatch, n_seq,
                          kv_unified, rpc_transfers, rpc_wire) -> None:
    """ValueError for the first option a context cannot take (see Context's arguments)."""
    # bool is an int subclass: n_ctx=True would otherwise be a context of one token
    for name, value in (("n_ctx", n_ctx), ("n_batch", n_batch), ("n_ubatch", n_ubatch)):
        if not is_int(value) or value <= 0:
            raise ValueError(f"{name} must be a positive int, not {value!r}")
    for name, value in (("n_ctx", n_ctx), ("n_batch", n_batch)):
        if value > MAX_N_CTX:
            raise ValueError(f"{name} must be at most {MAX_N_CTX}, not {value}")
    if n_ubatch > n_batch:
        raise ValueError(f"n_ubatch ({n_ubatch}) must not exceed n_batch ({n_batch})")
    if flash_attn not in FLASH_ATTN:
        raise ValueError(f"flash_attn must be True, False or 'auto', not {flash_attn!r}")
    if not is_int(max_in_flight) or not 0 <= max_in_flight <= MAX_N_CTX:
        raise ValueError(f"max_in_flight must be an int >= 0 (0: automatic), not {max_in_flight!r}")
    if first_ubatch is not None and (not is_int(first_ubatch) or not 0 < first_ubatch <= n_ubatch):
        raise ValueError(f"first_ubatch must be None or an int from 1 to n_ubatch ({n_ubatch}), not {first_ubatch!r}")
    if n_threads is not None and (not is_int(n_threads) or not 0 <= n_threads <= MAX_THREADS):
        raise ValueError(f"n_threads must be an int from 1 to {MAX_THREADS}, or None or 0 (automatic), "
                         f"not {n_threads!r}")
    if not is_int(n_seq) or not 1 <= n_seq <= MAX_SEQUENCES:
        raise ValueError(f"n_seq must be an int from 1 to {MAX_SEQUENCES}, not {n_seq!r}")
    if not isinstance(kv_unified, bool):
        raise ValueError(f"kv_unified must be True or False, not {kv_unified!r}")
    if not kv_unified and n_ctx % n_seq:
        raise ValueError(f"with kv_unified=False each of the {n_seq} sequences gets n_ctx / n_seq cells: make "
                         f"n_ctx ({n_ctx}) a multiple of n_seq")
    if rpc_transfers not in RPC_TRANSFERS:
        raise ValueError(f"rpc_transfers must be one of {RPC_TRANSFERS}, not {rpc_transfers!r}")
    if rpc_wire not in RPC_WIRE:
        raise ValueError(f"rpc_wire must be one of {tuple(RPC_WIRE)}, not {rpc_wire!r}")

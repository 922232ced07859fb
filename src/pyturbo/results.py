"""What a prefill returns (`PrefillResult`, `GeneratedTokens`, `Captured`), and the stated tolerances for the opt-in
settings that change the logits by rounding, with the one comparison they are checked by (`within_tolerance`)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import _native
from .timeline import Timeline


@dataclass
class PrefillResult:
    n_tokens: int
    seconds: float
    logits: np.ndarray                 # float32 [n_vocab], of the last token
    path: str                          # "pipelined" or "standard"
    fallback_reason: str = ""          # why the standard path ran ("" when pipelined)
    decision: str = ""                 # why that path was asked for (policy.decide)
    n_ubatches: int = 0
    n_stages: int = 0
    n_in_flight: int = 0
    slot_buffer_bytes: int = 0         # compute buffers of all in-flight slots, all devices (pipelined path)
    timeline: Timeline = field(default_factory=Timeline)
    # where the host's time went (pipelined path), seconds: "until_first_ubatch" (path decision, llama.cpp's batch
    # and KV bookkeeping), "first_graph" (building and queueing the first ubatch's graph), "graphs" (all ubatches')
    host_times: dict = field(default_factory=dict)
    # how activations went between RPC workers (pipelined path): "server-to-server", or "through this process: why"
    transfers: str = ""

    @property
    def tokens_per_second(self) -> float:
        return self.n_tokens / self.seconds if self.seconds > 0 else float("nan")

    @classmethod
    def from_native(cls, result, raw: list[tuple], devices: list[str], n_tokens: int, logits: np.ndarray,
                    decision: str, refused: str) -> "PrefillResult":
        """From a replay's struct llama_turbo_result and its raw records; refused: why Python kept the pipeline
        from running (it takes the place of the executor's fallback reason)."""
        ffi, lib = _native.ffi(), _native.lib()
        seconds = (result.t_end_us - result.t_start_us) / 1e6
        host_times = {} if not result.t_first_submit_us else {
            "until_first_ubatch": (result.t_first_submit_us - result.t_start_us) / 1e6,
            "first_graph": (result.t_first_queued_us - result.t_first_submit_us) / 1e6,
            "graphs": result.host_submit_us / 1e6}
        return cls(
            n_tokens=n_tokens, seconds=seconds, logits=logits,
            path="pipelined" if result.path == lib.LLAMA_TURBO_PATH_PIPELINED else "standard",
            fallback_reason=refused or ffi.string(result.fallback_reason).decode(), decision=decision,
            n_ubatches=result.n_ubatches, n_stages=result.n_stages, n_in_flight=result.n_in_flight,
            slot_buffer_bytes=result.slot_buffer_bytes,
            timeline=Timeline.from_raw(raw, devices, result.t_start_us, seconds), host_times=host_times,
            transfers=ffi.string(result.transfers).decode())


class GeneratedTokens(list):
    """What `Context.generate()` returns: the token ids, and why it stopped ("length" or "context")."""
    finish_reason: str = "length"


@dataclass
class Captured:
    """What Context.capture() queued: its decode_tokens() calls' token count, then the replay's `PrefillResult`."""
    n_tokens: int = 0
    result: "PrefillResult | None" = None


# first_ubatch moves every ubatch boundary, so the kernels see other shapes than with uniform ubatches and sum in another
# order or take another tile path: the logits differ by rounding. The bound is twice the largest difference measured
# (bench/results/2026-11-26-gpu-host-time.md); a wrong position, mask or KV slot moves them by a sizeable fraction
# of their range.
FIRST_UBATCH_TOLERANCE = 3e-2


# rpc_wire="f16"/"bf16" rounds each activation once per stage boundary: measured 0.08% (F16) and 0.3% (BF16) of the
# largest logit over 4 CPU workers (bench/results/2026-12-04-shaped-links.md); the bound leaves a factor of ten for
# deeper models and more stages.
RPC_WIRE_TOLERANCE = 3e-2
# Sequences that share a context's KV cache, or take a decode step together in one call: the kernels see other shapes
# (several rows in one matmul, a KV range that holds other sequences' masked cells), so a sequence's logits differ from
# a context of its own by rounding. Measured on the CPU: 1.5e-4 of the largest logit (tests/test_sequences.py).
SEQUENCE_BATCH_TOLERANCE = 3e-2


def within_tolerance(logits: np.ndarray, exact: np.ndarray, tolerance: float) -> bool:
    """Whether logits agree with exact ones as far as rounding can explain: within tolerance of the largest logit
    (at least of 1), with the same top token."""
    bound = tolerance * max(1.0, float(np.max(np.abs(exact))))
    return float(np.max(np.abs(logits - exact))) <= bound and int(np.argmax(logits)) == int(np.argmax(exact))


def within_first_ubatch_tolerance(logits: np.ndarray, uniform: np.ndarray) -> bool:
    """Logits computed with a first_ubatch against uniform ubatches': within FIRST_UBATCH_TOLERANCE."""
    return within_tolerance(logits, uniform, FIRST_UBATCH_TOLERANCE)

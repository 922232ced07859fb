"""What the batched generator (`pyturbo.batching`) runs next: how many prompt tokens a prefill chunk takes while other
sequences generate (`ChunkPlanner`, from the gap bound and this context's measured speeds), and which sequence a
request takes (`SequenceTable`, for the longest prompt prefix already in the KV cache)."""
from __future__ import annotations

import collections
import math
from typing import Sequence

import numpy as np

from .generation import common_prefix

# The default bound on a generating sequence's time between two tokens while another prompt prefills: on the 2-core
# box (4 RPC workers x 1 thread, the server bench model) it costs that prompt's time to first token little
# (bench/results/2026-12-04-server-chunking.md)
DEFAULT_MAX_GAP_MS = 1000.0
# A chunk is planned for this share of the bound: later chunks attend over more positions, so they are a little
# slower than the measured one
PLAN_SHARE = 0.85


class ChunkPlanner:
    """How many prompt tokens the next prefill takes while other sequences are generating.

    A prefill of k ubatches over S stages takes about k + S - 1 "units" on the pipeline (the first ubatch crosses
    every stage, then one more comes out per stage-time) and k on the standard path (each ubatch through all stages).
    A unit's time grows with the positions the ubatch attends to (attention), so it is modelled as a + b * P, P the
    chunk's middle position, fitted per path to the newest prefills of this context (observe_prefill; with one
    position measured, a unit is taken to grow in proportion to P beyond it: the cautious guess). The next chunk is
    the largest number of whole ubatches whose predicted time fits in the bound minus a decode step (observe_step),
    never fewer than min_tokens."""

    SAMPLES = 8   # prefills per path the fit looks at

    def __init__(self, n_ubatch: int, n_batch: int, n_stages: int, max_gap_s: float):
        self.n_ubatch, self.n_stages, self.max_gap_s = n_ubatch, max(1, n_stages), max_gap_s
        # chunk boundaries on ubatch boundaries of the whole prompt: n_batch-sized calls cut at multiples of n_ubatch
        # only when n_batch is one
        self.granule = n_ubatch if n_batch % n_ubatch == 0 else n_batch
        self.min_tokens = self._round_up((self.n_stages + 1) * n_ubatch)
        self.samples: dict[str, collections.deque] = {}   # path -> (middle position, seconds per unit)
        self.path = "pipelined"                           # the path the last prefill took: the next one's likely path
        self.step_seconds = 0.0

    def _round_up(self, n: int) -> int:
        return -(-n // self.granule) * self.granule

    def _units(self, n_tokens: int, path: str) -> int:
        k = math.ceil(n_tokens / self.n_ubatch)
        return k + self.n_stages - 1 if path == "pipelined" else k

    def observe_prefill(self, n_tokens: int, seconds: float, path: str, n_stages: int = 0, n_past: int = 0) -> None:
        """A prefill of n_tokens after n_past positions of its sequence took `seconds` on `path`."""
        if math.ceil(n_tokens / self.n_ubatch) < 2 or not seconds > 0:
            return
        if n_stages > 0:
            self.n_stages = n_stages
        samples = self.samples.setdefault(path, collections.deque(maxlen=self.SAMPLES))
        samples.append((n_past + n_tokens / 2, seconds / self._units(n_tokens, path)))
        self.path = path

    def observe_step(self, seconds: float) -> None:
        self.step_seconds = seconds if self.step_seconds == 0 else 0.7 * self.step_seconds + 0.3 * seconds

    def unit_seconds(self, path: str, position: float) -> float | None:
        """A unit's predicted time at this middle position, or None before anything was measured on that path."""
        samples = self.samples.get(path)
        if not samples:
            return None
        pos, unit = (np.array(x, dtype=np.float64) for x in zip(*samples))
        if len(pos) < 2 or pos.max() < 1.25 * pos.min() + self.n_ubatch:   # one position: grows with P beyond it
            return float(unit.mean() * max(1.0, position / max(pos.mean(), 1.0)))
        slope = max(0.0, float(np.cov(pos, unit, bias=True)[0, 1] / np.var(pos)))
        base = float(unit.mean() - slope * pos.mean())
        if base < 0:   # all of it grows with P
            base, slope = 0.0, float(np.dot(pos, unit) / np.dot(pos, pos))
        return base + slope * position

    def predicted_seconds(self, n_tokens: int, n_past: int, path: str | None = None) -> float | None:
        path = path or self.path
        unit = self.unit_seconds(path, n_past + n_tokens / 2)
        return None if unit is None else unit * self._units(n_tokens, path)

    def chunk_tokens(self, remaining: int, others_generating: bool, n_past: int = 0) -> int:
        """Tokens of a prompt with `remaining` tokens to prefill after n_past that the next prefill takes."""
        if not others_generating or remaining <= self.min_tokens:
            return remaining
        if self.predicted_seconds(self.min_tokens, n_past) is None:
            return self.min_tokens
        budget = PLAN_SHARE * self.max_gap_s - self.step_seconds
        lo, hi = self.min_tokens // self.granule, -(-remaining // self.granule)   # in granules: lo always taken
        while lo < hi:   # the largest count of granules that fits (the time grows with the count)
            mid = (lo + hi + 1) // 2
            if self.predicted_seconds(mid * self.granule, n_past) <= budget:
                lo = mid
            else:
                hi = mid - 1
        return min(lo * self.granule, remaining)


class SequenceTable:
    """What each sequence of the context holds (its tokens in the KV cache, as far as they are known) and whether a
    request is using it. Owned by the scheduler thread."""

    def __init__(self, n_seq: int):
        self.tokens: list[list[int]] = [[] for _ in range(n_seq)]
        self.busy = [False] * n_seq
        self.last_used = [0] * n_seq
        self._clock = 0

    @property
    def n_free(self) -> int:
        return self.busy.count(False)

    def choose(self, prompt: Sequence[int], cache_prompt: bool) -> tuple[int, int | None, int]:
        """(sequence for the prompt, a busy sequence to copy a prefix from or None, tokens to keep or copy). At least
        the prompt's last token is always left to compute (its logits start the generation)."""
        free = [s for s, busy in enumerate(self.busy) if not busy]
        if not free:
            raise RuntimeError("no free sequence")
        if not cache_prompt:
            return min(free, key=lambda s: self.last_used[s]), None, 0
        limit = len(prompt) - 1
        shared = [min(common_prefix(self.tokens[s], prompt), limit) for s in range(len(self.busy))]
        seq = max(free, key=lambda s: (shared[s], -self.last_used[s]))
        donor = max((s for s in range(len(self.busy)) if self.busy[s]), key=lambda s: shared[s], default=None)
        if donor is not None and shared[donor] > shared[seq]:
            return seq, donor, shared[donor]
        return seq, None, shared[seq]

    def take(self, seq: int, kept: Sequence[int]) -> None:
        self._clock += 1
        self.busy[seq], self.tokens[seq], self.last_used[seq] = True, list(kept), self._clock

    def extend(self, seq: int, tokens: Sequence[int]) -> None:
        self.tokens[seq].extend(int(t) for t in tokens)

    def release(self, seq: int, keep_tokens: bool = True) -> None:
        self.busy[seq] = False
        if not keep_tokens:
            self.tokens[seq] = []

    def forget_all(self) -> None:
        self.tokens = [[] for _ in self.busy]

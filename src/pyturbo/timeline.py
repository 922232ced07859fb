"""Per-ubatch timing records of a pipelined prefill: efficiency against the fill/drain bound, ASCII and PNG views.

The C side reports one record per (ubatch, stage) as it completes. A stage is the index of a layer device in chain
order; stage -1 is work on a device that holds no layers (e.g. the embedding lookup on the CPU), which is shown but
does not count towards the pipeline's efficiency.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

DTYPE = np.dtype([("ubatch", "i4"), ("pos0", "i4"), ("n_tokens", "i4"), ("stage", "i4"), ("device", "U64"),
                  ("start", "f8"), ("end", "f8"), ("clock", "U16")])


@dataclass(frozen=True)
class UbatchRecord:
    ubatch: int
    pos0: int          # position of the ubatch's first token
    n_tokens: int
    stage: int         # index among the layer devices, -1 for a device that holds no layers
    device: str
    start: float       # seconds since the prefill's start
    end: float
    clock: str = "host"  # how start/end were taken: "cuda-event" (timing events on the GPU) or "host" (host clock)

    @classmethod
    def from_raw(cls, raw: tuple, t0_us: int | float) -> UbatchRecord:
        """From a C-side tuple (ubatch, pos0, n_tokens, stage, device, t_start_us, t_end_us, clock), absolute µs."""
        u, p, n, s, d, t1, t2, clock = raw
        return cls(int(u), int(p), int(n), int(s), str(d), (t1 - t0_us) / 1e6, (t2 - t0_us) / 1e6, str(clock))


def _union_length(starts: np.ndarray, ends: np.ndarray) -> float:
    """Total length covered by the intervals, overlaps counted once (so a stage can never be busy > 100%)."""
    if not len(starts):
        return 0.0
    order = np.argsort(starts)
    s, e = starts[order], ends[order]
    first = np.r_[True, s[1:] > np.maximum.accumulate(e)[:-1]]   # where a new contiguous busy block begins
    idx = np.flatnonzero(first)
    return float((np.maximum.reduceat(e, idx) - s[idx]).sum())


class Timeline:
    """The records of one prefill, sorted by start time; `.array` is the numpy structured array behind them."""

    def __init__(self, records: Iterable[UbatchRecord] = (), stages: Sequence[str] = (), wall: float | None = None):
        arr = np.array([(r.ubatch, r.pos0, r.n_tokens, r.stage, r.device, r.start, r.end, r.clock) for r in records],
                       dtype=DTYPE)
        self.array = arr[np.argsort(arr["start"], kind="stable")]   # stable: ties keep the reporting order
        # Stage names: as given, extended from the records should they name more stages than given.
        names = list(stages)
        layer = self.array[self.array["stage"] >= 0]
        for s in range(len(names), int(layer["stage"].max()) + 1 if len(layer) else 0):
            hit = layer["device"][layer["stage"] == s]
            names.append(str(hit[0]) if len(hit) else f"stage{s}")
        self.stages: tuple[str, ...] = tuple(names)
        if wall is None:
            wall = float(self.array["end"].max() - self.array["start"].min()) if len(self.array) else 0.0
        self.wall = float(wall)

    @classmethod
    def from_raw(cls, raw: Iterable[tuple], stages: Sequence[str], t0_us: int | float, wall: float | None) -> Timeline:
        """From the C side's tuples (see UbatchRecord.from_raw)."""
        return cls((UbatchRecord.from_raw(r, t0_us) for r in raw), stages, wall)

    # ---- container ------------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.array)

    def __iter__(self) -> Iterator[UbatchRecord]:
        for r in self.array.tolist():   # tolist: plain Python ints, str and floats
            yield UbatchRecord(*r)

    def __repr__(self) -> str:
        return (f"Timeline({len(self)} records, {self.n_ubatches} ubatches, {len(self.stages)} stages, "
                f"wall {self.wall:.3f}s, efficiency {self.efficiency():.2f})")

    def to_records(self) -> list[dict]:
        """Plain dicts, ready for json.dump."""
        return [asdict(r) for r in self]

    def clocks(self) -> dict[str, str]:
        """How each device's records were timed ("cuda-event" or "host"), by device name."""
        return {str(d): str(c) for d, c in sorted(set(zip(self.array["device"], self.array["clock"])))}

    # ---- numbers --------------------------------------------------------------------------------------------------

    @property
    def n_ubatches(self) -> int:
        return len(np.unique(self.array["ubatch"]))

    def busy_seconds(self) -> dict[str, float]:
        """Busy time of each layer stage (stage >= 0), by stage name; idle stages are listed with 0."""
        a = self.array
        return {name: _union_length(a["start"][a["stage"] == s], a["end"][a["stage"] == s])
                for s, name in enumerate(self.stages)}

    def efficiency(self) -> float:
        """Σ busy time of the layer stages ÷ (S × wall): 1 would be every device busy all the time."""
        S = len(self.stages)
        if not len(self) or S == 0 or self.wall <= 0:
            return float("nan")
        return sum(self.busy_seconds().values()) / (S * self.wall)

    def ideal_speedup(self) -> float:
        """M·S/(M+S−1): the speed-up over running the stages one after the other, with equal stages and no
        overheads; short of S because the pipeline has to fill and drain."""
        M, S = self.n_ubatches, len(self.stages)
        return M * S / (M + S - 1) if M and S else float("nan")

    def ideal_efficiency(self) -> float:
        """M/(M+S−1): the efficiency() of that ideal pipeline."""
        M, S = self.n_ubatches, len(self.stages)
        return M / (M + S - 1) if M and S else float("nan")

    # ---- views ----------------------------------------------------------------------------------------------------

    def _rows(self) -> list[tuple[str, np.ndarray]]:
        """(label, records) per displayed row: the layer stages in chain order, then each non-layer device."""
        a = self.array
        rows = [(name, a[a["stage"] == s]) for s, name in enumerate(self.stages)]
        other = a[a["stage"] < 0]
        for dev in dict.fromkeys(other["device"].tolist()):   # in order of first appearance
            rows.append((f"{dev} (other)", other[other["device"] == dev]))
        return rows

    def _span(self) -> tuple[float, float]:
        # Times are relative to the prefill's start, so the axis starts at 0 and covers the wall time.
        lo = min(0.0, float(self.array["start"].min()))
        hi = max(lo + self.wall, float(self.array["end"].max()))
        return lo, hi if hi > lo else lo + 1e-9

    def ascii(self, width: int = 72) -> str:
        """Occupancy diagram: one row per device, one column per time slice, '#' when busy more than half of it."""
        if not len(self):
            return "no pipeline timing records (the standard path ran)"
        if width < 1:
            raise ValueError(f"width must be >= 1, not {width}")
        rows = self._rows()
        label_w = max(10, max(len(label) for label, _ in rows) + 2)
        lo, hi = self._span()
        edges = lo + (hi - lo) * np.arange(width + 1) / width
        left, right = f"{lo:.2f}s", f"{hi:.2f}s"
        lines = ["time".ljust(label_w) + left + right.rjust(max(width - len(left), len(right) + 1))]
        for label, recs in rows:
            # overlap of every record with every slice, summed per slice
            overlap = np.clip(np.minimum(recs["end"][:, None], edges[None, 1:])
                              - np.maximum(recs["start"][:, None], edges[None, :-1]), 0, None).sum(axis=0)
            busy = overlap > 0.5 * (hi - lo) / width
            lines.append(label.ljust(label_w) + "".join("#" if b else "." for b in busy))
        return "\n".join(lines)

    def plot(self, path: str | Path, title: str | None = None) -> Path:
        """Write a PNG Gantt chart: one row per device, one bar per record, colored by ubatch."""
        try:
            # Figure + the Agg canvas directly, not pyplot: no GUI needed, and the user's backend is left alone.
            import matplotlib
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError as e:
            raise ImportError("Timeline.plot needs matplotlib: pip install matplotlib (or pip install '.[plot]' in "
                              "the pyturbo checkout)") from e
        path = Path(path)
        rows = self._rows() if len(self) else []
        fig = Figure(figsize=(10, 1.5 + 0.5 * max(len(rows), 1)), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        # A cyclic colormap over a short period: neighbouring ubatches differ, and the wrap-around is smooth.
        cmap, period = matplotlib.colormaps["twilight"], 10
        if rows:
            lo, hi = self._span()
            char_w = (hi - lo) / 120   # roughly one 7-pt character on a 10-inch axis
            for y, (_, recs) in enumerate(rows):
                for r in recs:
                    color = cmap((int(r["ubatch"]) % period) / period)
                    ax.barh(y, r["end"] - r["start"], left=r["start"], height=0.8, color=color, edgecolor="none")
                    text = str(int(r["ubatch"]))
                    if r["end"] - r["start"] > (len(text) + 1) * char_w:
                        # dark text on the light ends of the colormap, light text on its dark middle
                        lum = 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]
                        ax.text((r["start"] + r["end"]) / 2, y, text, ha="center", va="center", fontsize=7,
                                color="black" if lum > 0.5 else "white")
            ax.set_xlim(lo, hi)
        else:
            ax.text(0.5, 0.5, "no pipeline timing records", ha="center", va="center", transform=ax.transAxes)
        ax.set_yticks(range(len(rows)), [label for label, _ in rows])
        ax.invert_yaxis()   # stage 0 on top, as in ascii()
        ax.set_xlabel("seconds")
        summary = (f"{self.n_ubatches} ubatches on {len(self.stages)} stages, {self.wall:.3f}s: "
                   f"efficiency {self.efficiency():.0%} (ideal {self.ideal_efficiency():.0%})")
        ax.set_title(f"{title}\n{summary}" if title else summary)
        fig.savefig(path, dpi=120)
        return path

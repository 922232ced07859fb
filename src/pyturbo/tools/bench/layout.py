"""The default layout, chosen from the machine, and the reason printed for it; the size of a synthetic preset."""
from __future__ import annotations

import math

from .. import synth
from ...devices import usable_cpu_cores

# Stock llama.cpp already overlaps two RPC stages on a CPU (the host only waits at the boundary copy), so a 2-stage
# split shows nothing to gain; from 3-4 stages on, stock leaves most stages idle while the pipeline keeps every stage
# busy (bench/results/2026-11-26-default-2core.md). More stages make stock slower still, but also the run longer.
DEFAULT_STAGES = 4
LARGE_PRESET_BYTES = 2 << 30      # a preset bigger than this is written only after --yes (or a yes at the prompt)
# --preset's choices: the dense llama shapes, then the GPT-OSS-shaped mixtures of experts
PRESET_NAMES = sorted(synth.PRESETS) + sorted(synth.GPT_OSS_PRESETS)


def default_setup(cores: int | None = None) -> dict:
    """Workers, threads, model and prompt lengths for this machine, and why (the `why` text is printed)."""
    cores = cores or usable_cpu_cores()
    stages = DEFAULT_STAGES
    threads = max(1, cores // stages)
    preset = "bench-16l" if cores >= 8 else "bench-8l"
    lengths = [1024, 4096]    # a short and a long prompt: a longer one makes every stock run of the default slow
    why = (f"{stages} local RPC workers x {threads} thread{'s' if threads > 1 else ''} on {cores} cores: stock "
           "llama.cpp already overlaps 2 RPC stages on a CPU (a 2-stage split shows about 1.0x), but keeps only about "
           f"1.5 of {stages} stages busy, while the pipeline keeps all of them busy")
    if stages > cores:
        why += (f"; {stages} single-thread workers share {cores} cores, so the split can at best match one process "
                "using every core (the ceiling column)")
    return {"workers": stages, "threads": threads, "preset": preset, "lengths": lengths, "why": why,
            "cores": cores}


def preset_bytes(name: str) -> int:
    """About how many bytes the synthetic preset's GGUF file takes."""
    import gguf
    shape = synth.preset_shape(name)
    if isinstance(shape, synth.GptOssShape):   # MXFP4 experts (17 bytes per 32 values), the rest F16 (or smaller F32)
        experts = 3 * shape.n_layer * shape.n_expert * shape.n_embd * shape.n_ff_exp
        return experts * 17 // 32 + (shape.n_params - experts) * 2
    qtype = gguf.GGMLQuantizationType[synth.DTYPES[shape.dtype][0]]
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    return math.ceil(shape.n_params * type_size / block)


def describe_bytes(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"

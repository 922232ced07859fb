#!/usr/bin/env bash
# One command on the lent GPU machine: install the carried wheels, build pyturbo (CUDA when a GPU is there,
# or PYTURBO_CUDA=OFF for the CPU-only runs), then run what the arguments name, logging everything to $OUT.
#
#   from a developer box (once):  bench/gpu/prepare.sh          # wheels into .whl/, llama.cpp tree fetched
#   device run:   carry [".whl", "vendor/llama.cpp/upstream"];  command: PYTURBO_CUDA=OFF bash bench/gpu/run.sh tests cpu-rpc-4 single
#
# Steps (any order, several allowed):
#   tests      the whole test suite (CUDA tests run when a GPU is present)
#   cpu-rpc-4  CPU-only RPC benchmark: 4 stages x 4 threads at 4096 tokens (ubatch sweep 512, 256, 128)
#   cpu-rpc-8  CPU-only RPC benchmark: 8 stages x 2 threads at 16384 tokens (UBATCH8, default 256: best measured)
#   single     the single-process reference ceiling (all cores, no split)
#   gpu        GPU benchmarks: GPU_PRESET (8b) over GPU_SPLITS (1 2 4) virtual CUDA devices of the first GPU,
#              GPU_LENGTHS, GPU_UBATCH
#   gpu-default  what a user of one GPU gets: GPU_PRESET on the first GPU with pyturbo's defaults (PYTURBO_GPU_STREAMS
#              auto, the dispatcher unforced), stock on one device vs the default layout, GPU_LENGTHS, GPU_UBATCH
#   gpu-multi  several physical GPUs: GPU_PRESET over GPU_COUNTS (default: all of them) GPUs, peer access off
#              (the pin's default) and on (GGML_CUDA_P2P=1) or as GPU_P2P says, GPU_LENGTHS, GPU_UBATCH. With
#              CMAKE_ARGS=-DGGML_CUDA_NO_PEER_COPY=ON (a build without peer copies, like consumer GPUs without P2P)
#              one mode, "nopeercopy"
#   gpu-balance  the layer split over GPU_COUNTS physical GPUs (peer access on): even, then tensor_split="auto"
#              (balanced from measured stage times), each against stock and one GPU in its own process
#   cpu-rpc-layouts  CPU RPC stages on 16 cores (CPU_SET, default 0-15: a 16-core machine on a bigger host):
#              RPC_STAGES (default "2 4 8") x (16 / stages) threads, bench-16l, RPC_LENGTHS (default 4096)
#   partial    partial offload: PARTIAL_CPU_LAYERS (default 8) layers on this process's CPU, the rest over the GPUs
#   host-time  where the time goes in a short pipelined prefill over all GPUs (peer access on): host work, hand-overs
#              (stage threads spinning off and on), CPU threads HOST_THREADS (0: default), first ubatch sizes
#              HOST_FIRST_UBATCH (0: uniform), with the host's checkpoints
#              (bench/gpu/host_time.py), GPU_LENGTHS
#   gpt-oss-host-experts  one GPU, the routed experts in host memory (Model(experts_in_host_memory=True), llama.cpp's
#              --cpu-moe): stock on one device vs pyturbo's default stream layout and the forced pipeline, alternating
#              processes (bench/gpu/gpt_oss_host_experts.py). HOST_EXPERTS_PRESET (gpt-oss-20b), HOST_EXPERTS_LENGTHS
#              (2048,8192,16384), HOST_EXPERTS_UBATCH (2048), BENCH_REPEAT (2), HOST_EXPERTS_ROUNDS (2),
#              HOST_EXPERTS_BUDGET (360 s: no mode of a length starts after it). Writes $OUT/gpt-oss-host-experts.md
#   h2d        this machine's host-to-device copy rate from pinned, registered and pageable memory, 1 MB..512 MB, expert
#              slices, 4 GB streamed (bench/gpu/h2d_bandwidth.cu, built here with nvcc), and the GPU's PCIe link as
#              nvidia-smi reports it. Writes $OUT/h2d.log
#   host-experts-probe  gpt-oss-20b, experts in host memory: the buffer type llama.cpp put them in (its load lines),
#              and every host-to-device copy of a 4096-token prefill at ubatch 2048 by the memory it reads (pinned or
#              pageable; bench/gpu/h2d_count.cpp preloaded), stock on one device and the forced pipeline on 4 stream
#              devices (bench/gpu/host_experts_probe.py; PROBE_LAYOUTS, default "1:off 4:force": streams:pipeline).
#              Writes $OUT/host-experts-probe.log
#   gpt-oss-streams  gpt-oss-20b on one GPU: the forced pipeline over SWEEP_STREAMS (1,2,4,6,8; 1 = stock) stream
#              devices at SWEEP_UBATCH (512,1024), SWEEP_TOKENS (8192) tokens, a process per stream count, interleaved
#              (bench/gpu/gpt_oss_streams_sweep.py; SWEEP_DEADLINE: unix time after which no process starts). Writes
#              $OUT/gpt-oss-streams.md and .json
# Every bench step measures the default (auto, calibrated first), the forced pipeline and stock, interleaved.
# BENCH_REPEAT: runs per setting (default 3, the median is shown). GPU_STOCK_BEST=1: stock's sweep of n_batch/n_ubatch.
# GPU_BENCH_ARGS: more options for the GPU benches (e.g. "--first-ubatch 256").
# PYTURBO_SKIP_BUILD=1: use the pyturbo this machine already installed (a second run.sh in one command, or a warm
# machine), building only if there is none.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/bench/out/gpu-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# auto's measurements and tensor_split="auto"'s balances, shared by the steps of this call and brought back
export PYTURBO_CALIBRATION=${PYTURBO_CALIBRATION:-$OUT/calibration.json}

if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
nproc > "$OUT/machine.txt"; nvidia-smi -L >> "$OUT/machine.txt" 2>&1

# The image's default g++ (/opt/gcc) links its own copy of libstdc++ into every shared library; several copies in
# one process crash (seen: a segfault in llama_model::print_info). The system compiler links the shared libstdc++.
# CUDAHOSTCXX: nvcc would otherwise pick /opt/gcc as its host compiler.
if [ -x /usr/bin/g++ ] && [ -x /usr/bin/gcc ]; then
    export CC=/usr/bin/gcc CXX=/usr/bin/g++ CUDAHOSTCXX=/usr/bin/g++
fi
if [ "${PYTURBO_SKIP_BUILD:-0}" = 1 ] && (cd /tmp && python3 -c "import pyturbo") 2>/dev/null; then
    echo "== build skipped (PYTURBO_SKIP_BUILD=1, pyturbo installed)"
else
    echo "== build (PYTURBO_CUDA=${PYTURBO_CUDA:-AUTO}, CXX=${CXX:-default}: $(${CXX:-c++} --version | head -1))"
    # a build made with another compiler cannot be reused; one made with this one can (a warm machine keeps it)
    if [ "$(cat build/.pyturbo-cxx 2>/dev/null)" != "${CXX:-default}|${CUDAHOSTCXX:-default}" ]; then rm -rf build; fi
    mkdir -p build && echo "${CXX:-default}|${CUDAHOSTCXX:-default}" > build/.pyturbo-cxx
    start=$(date +%s)
    if ! python3 -m pip install --no-build-isolation --no-index --no-deps -v . > "$OUT/build.log" 2>&1; then
        tail -50 "$OUT/build.log"; exit 1
    fi
    echo "built in $(( $(date +%s) - start )) s"
fi
python3 -c "import pyturbo, json; print(json.dumps(pyturbo.build_info()))" | tee "$OUT/build_info.json"

# gpu_bench NAME [bench options...]: the GPU benchmark over GPU_PRESET, GPU_LENGTHS, GPU_UBATCH, into $OUT/NAME
# (and NAME.log, without the progress bar's lines); the caller sets the environment that picks the layout
gpu_bench() {
    local name=$1; shift
    python3 -m pyturbo.bench --gpu --yes --preset "${GPU_PRESET:-8b}" --flash-attn on --lengths "${GPU_LENGTHS:-4096,16384}" \
        --ubatch "${GPU_UBATCH:-512}" --repeat "${BENCH_REPEAT:-3}" $([ "${GPU_STOCK_BEST:-0}" = 1 ] || echo --no-sweep) \
        ${GPU_BENCH_ARGS:-} "$@" --out "$OUT/$name" 2>&1 \
        | tr '\r' '\n' | grep -v "^bench:\|^writing" | tee "$OUT/$name.log"
}

for step in "$@"; do
    case "$step" in
    tests)
        echo "== tests"
        python3 -m pytest tests -q -x -ra -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" | tail -25 ;;
    cpu-rpc-4)
        echo "== CPU RPC, 4 stages x 4 threads, 4096 tokens"
        python3 -m pyturbo.bench --preset bench-16l --workers 4 --threads 4 --lengths 4096 --ubatch 512,256,128 \
            --out "$OUT/cpu-rpc-4x4" 2>&1 | tee "$OUT/cpu-rpc-4x4.log" | grep -v "^bench:" ;;
    cpu-rpc-8)
        echo "== CPU RPC, 8 stages x 2 threads, 16384 tokens"
        python3 -m pyturbo.bench --preset bench-16l --workers 8 --threads 2 --lengths 16384 --ubatch ${UBATCH8:-256} --no-stock-best \
            --out "$OUT/cpu-rpc-8x2" 2>&1 | tee "$OUT/cpu-rpc-8x2.log" | grep -v "^bench:" ;;
    single)
        echo "== single process reference, 16 threads"
        python3 bench/single_process.py --preset bench-16l --threads "$(nproc)" --lengths 4096,16384 2>&1 | tee "$OUT/single.log" ;;
    gpu)
        # one GPU split into N virtual CUDA devices (own stream each); N=1 is single-device stock
        for n in ${GPU_SPLITS:-1 2 4}; do
            echo "== GPU, GGML_CUDA_DEVICES=$n, ${GPU_PRESET:-8b}"
            CUDA_VISIBLE_DEVICES=0 GGML_CUDA_DEVICES=$n gpu_bench "gpu-${GPU_PRESET:-8b}-$n" --no-ceiling
        done ;;
    cpu-rpc-layouts)
        for w in ${RPC_STAGES:-2 4 8}; do
            echo "== CPU RPC, $w stages x $((16 / w)) threads, cores ${CPU_SET:-0-15}"
            taskset -c "${CPU_SET:-0-15}" python3 -m pyturbo.bench --preset bench-16l --workers "$w" --threads $((16 / w)) --lengths "${RPC_LENGTHS:-4096}" \
                --repeat "${BENCH_REPEAT:-3}" --no-sweep --out "$OUT/cpu-rpc-$w" 2>&1 | tr '\r' '\n' | grep -v "^bench:" \
                | tee "$OUT/cpu-rpc-$w.log"
        done ;;
    partial)
        n_gpus=$(nvidia-smi -L | grep -c '^GPU')
        devs=CPU$(for i in $(seq 0 $((n_gpus - 1))); do printf ',CUDA%d' "$i"; done)
        echo "== partial offload: ${PARTIAL_CPU_LAYERS:-8} layers on the CPU, the rest over $n_gpus GPUs ($devs)"
        n_layer=32; rest=$(( (n_layer - ${PARTIAL_CPU_LAYERS:-8}) / n_gpus ))
        split=${PARTIAL_CPU_LAYERS:-8}$(for i in $(seq 1 "$n_gpus"); do printf ',%d' "$rest"; done)
        ( unset GGML_CUDA_DEVICES; gpu_bench "partial-${GPU_PRESET:-8b}-cpu${PARTIAL_CPU_LAYERS:-8}" --devices "$devs" \
            --tensor-split "$split" --no-ceiling --client-threads "$(nproc)" ) ;;
    gpu-balance)
        n_gpus=$(nvidia-smi -L | grep -c '^GPU')
        for n in ${GPU_COUNTS:-$n_gpus}; do
            [ "$n" -le "$n_gpus" ] || { echo "skipping $n GPUs: this machine has $n_gpus"; continue; }
            for split in even auto; do
                echo "== GPU, $n physical GPUs, peer access on, tensor split $split, ${GPU_PRESET:-8b}"
                ( export GGML_CUDA_P2P=1; unset GGML_CUDA_DEVICES PYTURBO_PIPELINE
                  CUDA_VISIBLE_DEVICES=$(seq -s, 0 $((n - 1))) gpu_bench "gpu-balance-${GPU_PRESET:-8b}-$n-$split" \
                      --tensor-split "$split" )
            done
        done ;;
    gpu-default)
        echo "== GPU, first GPU, pyturbo defaults, ${GPU_PRESET:-8b}"
        ( unset GGML_CUDA_DEVICES PYTURBO_GPU_STREAMS PYTURBO_PIPELINE
          CUDA_VISIBLE_DEVICES=0 gpu_bench "gpu-default-${GPU_PRESET:-8b}" ) ;;
    gpu-multi)
        n_gpus=$(nvidia-smi -L | grep -c '^GPU')
        p2p_modes=${GPU_P2P:-off on}
        # built with CMAKE_ARGS=-DGGML_CUDA_NO_PEER_COPY=ON: the consumer-rig case (the GPUs cannot copy to each
        # other and have no events, so stock's pipeline parallelism is off); the run-time peer switch does not apply
        case "${CMAKE_ARGS:-}" in *GGML_CUDA_NO_PEER_COPY=ON*) p2p_modes=nopeercopy ;; esac
        for n in ${GPU_COUNTS:-$n_gpus}; do
            [ "$n" -le "$n_gpus" ] || { echo "skipping $n GPUs: this machine has $n_gpus"; continue; }
            visible=$(seq -s, 0 $((n - 1)))
            for p2p in $p2p_modes; do
                echo "== GPU, $n physical GPUs, peer access $p2p, ${GPU_PRESET:-8b}"
                # the pin enables peer access only when GGML_CUDA_P2P is set; without it copies go through the host.
                # the bench measures the default (auto) and the forced pipeline side by side
                ( [ $p2p = on ] && export GGML_CUDA_P2P=1; unset GGML_CUDA_DEVICES PYTURBO_PIPELINE
                  CUDA_VISIBLE_DEVICES=$visible gpu_bench "gpu-multi-${GPU_PRESET:-8b}-$n-p2p-$p2p" )
            done
        done ;;
    host-time)
        echo "== host time, all GPUs, peer access on, ${GPU_PRESET:-8b}"
        ( export GGML_CUDA_P2P=1; unset GGML_CUDA_DEVICES PYTURBO_PIPELINE
          python3 bench/gpu/host_time.py --preset "${GPU_PRESET:-8b}" --tokens "${GPU_LENGTHS:-2048}" \
              --ubatch "${GPU_UBATCH:-512}" --threads "${HOST_THREADS:-0}" --first-ubatch "${HOST_FIRST_UBATCH:-0}" > "$OUT/host-time.log" 2> "$OUT/host-trace.log"; echo "rc $?"
          grep -v "^CUDA\|^CPU\|^time" "$OUT/host-time.log"; tail -3 "$OUT/host-trace.log" ) ;;
    gpt-oss-host-experts)
        echo "== GPT-OSS, experts in host memory, first GPU, ${HOST_EXPERTS_PRESET:-gpt-oss-20b}"
        ( unset GGML_CUDA_DEVICES PYTURBO_GPU_STREAMS PYTURBO_PIPELINE
          CUDA_VISIBLE_DEVICES=0 python3 bench/gpu/gpt_oss_host_experts.py \
              --preset "${HOST_EXPERTS_PRESET:-gpt-oss-20b}" --lengths "${HOST_EXPERTS_LENGTHS:-2048,8192,16384}" \
              --ubatch "${HOST_EXPERTS_UBATCH:-2048}" --repeat "${BENCH_REPEAT:-2}" \
              --rounds "${HOST_EXPERTS_ROUNDS:-2}" --budget "${HOST_EXPERTS_BUDGET:-360}" \
              --out "$OUT/gpt-oss-host-experts.md" 2> "$OUT/gpt-oss-host-experts.log" > /dev/null
          echo "rc $?"; cat "$OUT/gpt-oss-host-experts.md" 2>/dev/null; tail -8 "$OUT/gpt-oss-host-experts.log" ) ;;
    h2d)
        echo "== host-to-device copy rate"
        ( nvidia-smi --query-gpu=name,pci.bus_id,pcie.link.gen.current,pcie.link.gen.max,pcie.link.width.current,pcie.link.width.max --format=csv
          nvidia-smi -q | grep -i -A2 "confidential\|Link Width\|PCIe Generation\|Bus Id\|virtualization\|Host VGPU"
          nvidia-smi conf-compute -f 2>&1 | head -3
          uname -r; grep -i -o "iommu[^ ]*\|swiotlb[^ ]*\|mem_encrypt[^ ]*" /proc/cmdline
          dmesg 2>/dev/null | grep -i "swiotlb\|iommu\|DMA\|Memory Encryption\|SEV\|TDX" | head -12
          nvcc -O2 -arch=sm_90 -o /tmp/h2d bench/gpu/h2d_bandwidth.cu && /tmp/h2d "${H2D_STREAM_GB:-4}" ) 2>&1 | tee "$OUT/h2d.log" ;;
    host-experts-probe)
        echo "== GPT-OSS, experts in host memory: buffers and copies"
        ( unset GGML_CUDA_DEVICES PYTURBO_PIPELINE
          g++ -O2 -shared -fPIC -I"$(dirname "$(dirname "$(command -v nvcc)")")/include" -o /tmp/h2d_count.so bench/gpu/h2d_count.cpp -ldl
          for layout in ${PROBE_LAYOUTS:-1:off 4:force}; do
              set -- ${layout/:/ }
              echo "-- PYTURBO_GPU_STREAMS=$1, pipeline $2"
              CUDA_VISIBLE_DEVICES=0 PYTURBO_GPU_STREAMS=$1 LD_PRELOAD=/tmp/h2d_count.so \
                  python3 bench/gpu/host_experts_probe.py --mode "$2" --tokens "${PROBE_TOKENS:-4096}" --ubatch 2048
          done ) 2>&1 | tee "$OUT/host-experts-probe.log" ;;
    gpt-oss-streams)
        echo "== GPT-OSS, one GPU, stream devices x ubatch, forced pipeline vs stock"
        ( unset GGML_CUDA_DEVICES PYTURBO_GPU_STREAMS PYTURBO_PIPELINE
          CUDA_VISIBLE_DEVICES=0 python3 bench/gpu/gpt_oss_streams_sweep.py --tokens "${SWEEP_TOKENS:-8192}" \
              --streams "${SWEEP_STREAMS:-1,2,4,6,8}" --ubatch "${SWEEP_UBATCH:-512,1024}" --repeat "${BENCH_REPEAT:-3}" \
              --rounds "${SWEEP_ROUNDS:-2}" --deadline "${SWEEP_DEADLINE:-0}" --out "$OUT/gpt-oss-streams.md" ) 2>&1 \
            | tee "$OUT/gpt-oss-streams.log" ;;
    *) echo "unknown step $step"; exit 2 ;;
    esac
done

# The device hands back a limited number of files: keep the logs as they are and pack each step's folder (reports,
# JSON with the timelines, plots) into one archive per run.sh call. Unpack with: tar xzf results-*.tgz
dirs=$(cd "$OUT" && find . -mindepth 1 -maxdepth 1 -type d -printf '%P\n')
if [ -n "$dirs" ]; then
    archive=results-$(date +%H%M%S).tgz
    (cd "$OUT" && tar czf "$archive" $dirs && rm -rf $dirs) && echo "results: $OUT/$archive ($(echo $dirs | wc -w) folders)"
fi

#!/usr/bin/env bash
# On a developer box: what must travel to the GPU machine (it has no package index): wheels for its Python 3.12
# that it lacks, and the pinned llama.cpp tree (fetched and verified by the build script, ~36 MB).
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl cffi==2.0.0 pycparser gguf==0.19.0 tqdm
python3 vendor/llama.cpp/fetch.py --vendor vendor/llama.cpp --patches patches > /dev/null
du -sh .whl vendor/llama.cpp/upstream
echo 'carry: [".whl", "vendor/llama.cpp/upstream"]   command: PYTURBO_CUDA=OFF bash bench/gpu/run.sh tests cpu-rpc-4 single'

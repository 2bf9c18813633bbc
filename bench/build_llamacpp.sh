#!/usr/bin/env bash
# Build llama.cpp once into a cache folder, for bench/model.py's peer measurement.
#
# llama.cpp comes from the llama-cpp-python source distribution on PyPI, which bundles
# llama.cpp, its convert_hf_to_gguf.py and gguf-py (vendor/llama.cpp). CPU defaults,
# Release, only the two tools the bench runs (llama-bench, llama-batched-bench).
#
#   bench/build_llamacpp.sh            # -> $OPENK2_LLAMACPP_DIR (default ~/.cache/openk2/llamacpp)
#   PIP=/path/to/pip bench/build_llamacpp.sh
#
# Needs cmake and a C++ compiler (Debian/Ubuntu: apt-get install cmake g++). On 2 loaded
# cores the build takes 10-20 minutes.
set -euo pipefail

CACHE="${OPENK2_LLAMACPP_DIR:-$HOME/.cache/openk2/llamacpp}"
PIP="${PIP:-python -m pip}"
JOBS="${JOBS:-$(nproc)}"
mkdir -p "$CACHE"
cd "$CACHE"

sdist=$(ls llama_cpp_python-*.tar.gz 2>/dev/null | sort -V | tail -1 || true)
if [ -z "$sdist" ]; then
    $PIP download --no-deps --no-binary :all: llama-cpp-python -d "$CACHE"
    sdist=$(ls llama_cpp_python-*.tar.gz | sort -V | tail -1)
fi
src="${sdist%.tar.gz}"
[ -d "$src" ] || tar xzf "$sdist"
ln -sfn "$src/vendor/llama.cpp" "$CACHE/llama.cpp"

cmake -S "$CACHE/llama.cpp" -B "$CACHE/build" -DCMAKE_BUILD_TYPE=Release \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
    -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF
cmake --build "$CACHE/build" --config Release -j "$JOBS" --target llama-bench llama-batched-bench
ls -l "$CACHE/build/bin/llama-bench" "$CACHE/build/bin/llama-batched-bench"
echo "llama.cpp built in $CACHE/build/bin (converter: $CACHE/llama.cpp/convert_hf_to_gguf.py)"

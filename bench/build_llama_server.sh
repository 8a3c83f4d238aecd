#!/usr/bin/env bash
# Builds llama.cpp's C++ `llama-server` (an anchor for bench/server_load.py) from the llama.cpp
# sources that the pinned llama-cpp-python vendors, with the same CPU flags as the project's wheel
# (GGML_OPENMP off, portable AVX2). Everything lands in bench/out/ (git-ignored); the README's
# commands never run this. Takes about 10 minutes on 2 cores; a second run reuses the build.
#
#   bash bench/build_llama_server.sh   # prints the binary's path
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
version="$(sed -n 's/^LLAMA_CPP_VERSION := //p' "$root/Makefile")"
src="$here/out/llama-src"
bin="$src/build/bin/llama-server"
if [[ -x "$bin" ]]; then echo "$bin"; exit 0; fi
mkdir -p "$src"
tarball="$src/llama_cpp_python-$version.tar.gz"
if [[ ! -f "$tarball" ]]; then
  "$root/.venv/bin/python" -m pip download --no-binary :all: --no-deps \
    "llama-cpp-python==$version" -d "$src" >&2
fi
tar xzf "$tarball" -C "$src"
cmake -S "$src/llama_cpp_python-$version/vendor/llama.cpp" -B "$src/build" -G Ninja \
  -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON \
  -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_OPENMP=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
  -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON >&2
cmake --build "$src/build" --target llama-server -j "$(nproc)" >&2
echo "$bin"

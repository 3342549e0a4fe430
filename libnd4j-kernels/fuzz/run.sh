#!/usr/bin/env bash
# Builds the libFuzzer harness (clang, ASan + UBSan) over the library sources and fuzzes for the given seconds.
#   libnd4j-kernels/fuzz/run.sh [seconds=60] [extra libFuzzer flags...]
# Needs clang >= 15 with libFuzzer (the sources use _Float16); Debian 12: apt-get install clang-16 libclang-rt-16-dev.
# Crashing inputs land in libnd4j-kernels/target/fuzz/ (crash-*), the corpus in libnd4j-kernels/target/fuzz/corpus.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
seconds="${1:-60}"
shift || true
out="$root/target/fuzz"
mkdir -p "$out/corpus"

cxx="${CXX_FUZZ:-}"
if [ -z "$cxx" ]; then
  for c in clang++ clang++-19 clang++-18 clang++-17 clang++-16 clang++-15; do
    if command -v "$c" >/dev/null; then cxx="$c"; break; fi
  done
fi
if [ -z "$cxx" ]; then
  echo "fuzz/run.sh: no clang++ found (apt-get install clang-16 libclang-rt-16-dev)" >&2
  exit 2
fi

# The CPU library (without CUDA) plus the harness, instrumented together.
srcs=("$root"/src/api.cpp "$root"/src/common/*.cpp "$root"/src/cpu/*.cpp "$root"/src/cuda_unavailable.cpp)
"$cxx" -std=c++17 -O1 -g -fno-omit-frame-pointer -fsanitize=fuzzer,address,undefined \
  -fno-sanitize-recover=undefined -I"$root/include" -I"$root/src" \
  "${srcs[@]}" "$here/fuzz_api.cpp" -o "$out/fuzz_api" -lpthread -lrt
# Symbolised reports if the matching llvm-symbolizer is installed.
sym="$(dirname "$(readlink -f "$(command -v "$cxx")")")/llvm-symbolizer"
[ -x "$sym" ] && export ASAN_SYMBOLIZER_PATH="$sym"
echo "fuzz/run.sh: built $out/fuzz_api with $cxx; fuzzing for ${seconds}s"
cd "$out"
exec ./fuzz_api -max_total_time="$seconds" -max_len=2048 -timeout=10 -rss_limit_mb=4096 -print_final_stats=1 \
  "$@" corpus

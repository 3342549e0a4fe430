#!/usr/bin/env bash
# device_check.sh — everything the GPU machine runs in one go: build the native module with CUDA, the GPU tests (ranks as
# threads with peer access, and as processes with CUDA IPC; both backends), compute-sanitizer memcheck and racecheck on
# a small case, the peer-dies test, and the bench_ep table. Logs go to $OUT (or ./device-logs).
#   scripts/device_check.sh [all|tests|bench|moe|quick|sweep]
#   moe: the MoE block's GPU tests, memcheck on its single-rank cases and bench_moe (EP1 and EP2 on one GPU, EP2
#   repeated);
#   quick: the shortest run of the GPU test programs: the block (moe), then the default round trip and step recovery.
# Passes, or skips with a printed reason, on 1, 2 and 4 GPUs: cases that need one GPU per rank (NCCL all-to-all) or
# ranks on their own GPUs (compute-sanitizer) say why they were not run. CUDA_ARCHS (e.g. 90) limits the build to
# the machine's architecture.
set -u
export NCCL_NVLS_ENABLE=0 NVSHMEM_DISABLE_NVLS=1
# Two ranks on one GPU must not load kernels lazily inside a step (README: "Two ranks on one GPU").
export CUDA_MODULE_LOADING=EAGER
what=${1:-all}
here=$(cd "$(dirname "$0")/.." && pwd)
out=${OUT:-$here/device-logs}
build=${BUILD:-$here/target/cudabuild}
mkdir -p "$out"
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
nvidia-smi topo -m >> "$out/nvidia-smi.txt" 2>&1
cmake -S "$here" -B "$build" -DDEEPEP4J_CUDA=ON -DCMAKE_BUILD_TYPE=Release ${CUDA_ARCHS:+-DCMAKE_CUDA_ARCHITECTURES=$CUDA_ARCHS} \
  > "$out/build.log" 2>&1 &&
  cmake --build "$build" -j "$(nproc)" >> "$out/build.log" 2>&1 || { echo "build failed"; tail -40 "$out/build.log"; exit 1; }
echo "build ok"
status=0
gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then gpus=$(echo "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | grep -c .); fi
echo "GPUs visible: $gpus"
skip() {  # name, reason
  echo "$1: skipped ($2)"
}
run() {  # name, timeout seconds, command...
  local name=$1 secs=$2; shift 2
  local t0=$(date +%s)
  timeout "$secs" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  local skips=$(grep -c 'skipped' "$out/$name.log"); [ "$skips" = 0 ] && skips=
  echo "$name: rc=$rc ($(( $(date +%s) - t0 )) s) $(grep -E 'case\(s\) run|FAIL|ERROR SUMMARY' "$out/$name.log" | head -5 | tr '\n' ' ')${skips:+ [$skips skip notes: $(grep -m1 'skipped' "$out/$name.log" | sed 's/^ *//')]}"
  [ $rc -eq 0 ] || status=1
}
if [ "$what" = all ] || [ "$what" = tests ]; then
  ce="DEEPEP4J_CUDA_TRANSFER=copy_engine DEEPEP4J_TEST_BUFFER_MB=64"
  run gpu_roundtrip 300 "$build/gpu_test_roundtrip"
  run gpu_step_recovery 120 "$build/gpu_test_step_recovery"
  run gpu_roundtrip_sm 300 env DEEPEP4J_CUDA_TRANSFER=sm "$build/gpu_test_roundtrip"
  run gpu_roundtrip_ce 300 env $ce "$build/gpu_test_roundtrip"
  run gpu_roundtrip_ce_direct 300 env $ce DEEPEP4J_TEST_POOL_PEER_ACCESS=1 "$build/gpu_test_roundtrip"
  run gpu_cross_process 300 "$build/gpu_test_cross_process"
  run gpu_cross_process_ce 300 env $ce "$build/gpu_test_cross_process"
  run gpu_peer_dies 120 "$build/gpu_test_peer_dies"
  run gpu_peer_dies_ce 120 env $ce "$build/gpu_test_peer_dies"
  # The tests themselves leave out alltoall cases that need more GPUs than there are (NCCL: one GPU per rank) and say so.
  san="compute-sanitizer --error-exitcode 9 --target-processes all"
  if [ "$gpus" -ge 2 ]; then
    run sanitizer_memcheck_sm 300 env DEEPEP4J_TEST_BACKENDS=deepep DEEPEP4J_CUDA_TRANSFER=sm $san --tool memcheck "$build/gpu_test_roundtrip" two_ranks_every_dtype
    run sanitizer_memcheck_ce 300 env DEEPEP4J_TEST_BACKENDS=deepep $ce DEEPEP4J_TEST_POOL_PEER_ACCESS=1 $san --tool memcheck "$build/gpu_test_roundtrip" two_ranks_every_dtype
    run sanitizer_racecheck_ce 300 env DEEPEP4J_TEST_BACKENDS=deepep $ce $san --tool racecheck "$build/gpu_test_roundtrip" many_steps
  else
    why="the cases have two ranks, which would share the one GPU: compute-sanitizer serialises kernels, so ranks spinning for each other deadlock"
    for name in sanitizer_memcheck_sm sanitizer_memcheck_ce sanitizer_racecheck_ce; do skip $name "$why"; done
  fi
fi
if [ "$what" = all ] || [ "$what" = bench ]; then
  run bench_ep 400 "$build/bench_ep" --device cuda
  cat "$out/bench_ep.log"
  run bench_ep_64sms 300 "$build/bench_ep" --device cuda --backends deepep-sm,deepep-ce --num-sms 64 --chunk 32
  cat "$out/bench_ep_64sms.log"
fi
if [ "$what" = all ] || [ "$what" = moe ] || [ "$what" = quick ]; then
  lim() { if [ "$what" = quick ]; then echo "$2"; else echo "$1"; fi; }  # quick: tighter limits (a hang leaves time)
  run gpu_moe_block $(lim 400 150) "$build/gpu_test_moe_block"
  run bench_moe $(lim 400 150) "$build/bench_moe"
  # 2 ranks on one GPU, each shape 5 times with new buffers and blocks: a first-use deadlock shows up as a timeout.
  run bench_moe_ep2_repeat $(lim 300 120) "$build/bench_moe" --ranks 2 --iters 3 --repeat 5 --timeout-ms 15000
  run sanitizer_memcheck_moe $(lim 400 100) compute-sanitizer --error-exitcode 9 --tool memcheck "$build/gpu_test_moe_block" gpu_single_rank
  cat "$out/bench_moe.log"
fi
if [ "$what" = quick ]; then
  run gpu_step_recovery 60 "$build/gpu_test_step_recovery"
  run gpu_roundtrip 120 "$build/gpu_test_roundtrip"
fi
if [ "$what" = sweep ]; then
  run bench_sweep 500 "$build/bench_ep" --device cuda --tokens 512,4096 --sweep
  cat "$out/bench_sweep.log"
fi
exit $status

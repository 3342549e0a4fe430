#!/usr/bin/env bash
# Java on a GPU machine that has no Java: a jlink'd JRE plus the test/run classpath, packed here into two parts that
# each fit one 64 MiB device run, unpacked there under /tmp (which survives between two back-to-back runs while the
# machine stays up), then the GPU-tagged JUnit tests, the staging and step benchmarks and the main job with --device cuda.
#
#   here, after `mvn install -DskipTests`:
#     examples/scripts/gpu-java.sh pack DIR [libdeepep4j.so built with CUDA]
#         -> DIR/part1 (JRE + jars except the ones below, tar | xz -7) and DIR/part2 (nd4j-native and openblas linux
#            jars re-zipped stored so xz compresses the .so inside, three already-compressed jars part 1 has no room for,
#            the libnd4j-kernels jar carrying the CUDA engine, this script)
#   there, run 1:  bash DIR/part1/gpu-java.sh unpack1 DIR/part1
#   there, run 2 (issued right after run 1 returns):  bash DIR/part2/gpu-java.sh run DIR/part2 "$OUT"
#         -> checks that part 1 is still unpacked (says so plainly and stops if not: start again from run 1),
#            unpacks part 2, runs the tests, the step benchmark at the 2048-wide shape, the queue copies, the main job,
#            the step benchmark at the example's shape and the staging benchmark, in that order; logs in $OUT.
set -euo pipefail
ROOT=/tmp/deepep4j-java
MODULES="java.base,java.logging,java.management,java.naming,java.sql,java.xml,java.desktop,jdk.unsupported,java.scripting,jdk.management,java.instrument,jdk.zipfs"
TWO_JARS='nd4j-native-*-linux-x86_64.jar openblas-*-linux-x86_64.jar'
# already-compressed jars that part 1 has no room for (xz gains nothing on them; part 2 has room)
PART2_AS_IS='fastutil-*.jar pdfbox-*.jar fontbox-*.jar'
JUNIT_CONSOLE=org/junit/platform/junit-platform-console-standalone/1.10.2/junit-platform-console-standalone-1.10.2.jar

restore_stored() {  # $1 jar -> same jar, every entry stored (zip -0), so xz sees the shared libraries uncompressed
  local jar=$1 tmp; tmp=$(mktemp -d)
  (cd "$tmp" && unzip -q "$jar" && rm -f "$jar" && zip -q -0 -r -X "$jar" .)
  rm -rf "$tmp"
}

pack() {
  local out=$1 cudalib=${2:-} repo=${MAVEN_REPO:-$HOME/.m2/repository}
  local here; here=$(cd "$(dirname "$0")/../.." && pwd)
  local work; work=$(mktemp -d)
  mkdir -p "$out/part1" "$out/part2" "$work/lib" "$work/tests"
  out=$(cd "$out" && pwd)
  cp "$here"/examples/target/lib/*.jar "$work/lib/"
  # the project's own jars straight from the modules (lib/ may hold older copies)
  for m in libnd4j-kernels nd4j-deepep-ops dl4j-moe-layer; do cp "$here/$m/target/$m-0.1.0-SNAPSHOT.jar" "$work/lib/"; done
  cp "$here/examples/target/deepep4j-examples.jar" "$work/"
  for m in nd4j-deepep-ops dl4j-moe-layer; do jar cf "$work/tests/$m-tests.jar" -C "$here/$m/target/test-classes" .; done
  cp "$repo/$JUNIT_CONSOLE" "$work/tests/" || { echo "missing $repo/$JUNIT_CONSOLE: mvn dependency:get -Dartifact=org.junit.platform:junit-platform-console-standalone:1.10.2"; exit 1; }
  "${JAVA_HOME:-/usr}/bin/jlink" --add-modules "$MODULES" --strip-debug --no-header-files --no-man-pages --compress=0 --output "$work/jre"
  mkdir -p "$work/two"
  for p in $TWO_JARS; do mv "$work"/lib/$p "$work/two/"; done
  for j in "$work"/two/*.jar; do restore_stored "$j"; done
  for p in $PART2_AS_IS; do mv "$work"/lib/$p "$work/two/"; done
  if [ -n "$cudalib" ]; then  # the engine jar with the CUDA build of libdeepep4j.so in place of the CPU one
    local k="$work/lib/libnd4j-kernels-0.1.0-SNAPSHOT.jar" t; t=$(mktemp -d)
    mkdir -p "$t/org/deepep4j/natives/linux-x86_64" && cp "$cudalib" "$t/org/deepep4j/natives/linux-x86_64/libdeepep4j.so"
    (cd "$t" && zip -q "$k" org/deepep4j/natives/linux-x86_64/libdeepep4j.so) && mv "$k" "$work/two/" && rm -rf "$t"
  fi
  tar -C "$work" -cf - jre lib tests deepep4j-examples.jar | xz -7 -T2 > "$out/part1/part1.tar.xz"
  tar -C "$work/two" -cf - . | xz -7 -T2 > "$out/part2/part2.tar.xz"
  cp "$0" "$out/part1/gpu-java.sh"; cp "$0" "$out/part2/gpu-java.sh"
  rm -rf "$work"
  du -sh "$out/part1" "$out/part2"
  for p in part1 part2; do
    local b; b=$(du -sb "$out/$p" | cut -f1)
    [ "$b" -lt $((62 * 1024 * 1024)) ] || { echo "$p is $b bytes: more than one run carries (64 MiB with the tree)"; exit 1; }
  done
}

unpack1() {
  rm -rf "$ROOT" && mkdir -p "$ROOT"
  xz -dc "$1/part1.tar.xz" | tar -C "$ROOT" -xf -
  "$ROOT/jre/bin/java" -version 2>&1 | head -1
  echo "part 1 unpacked into $ROOT ($(du -sh "$ROOT" | cut -f1)); issue run 2 now"
}

run() {
  local part2=$1 out=$2
  if [ ! -x "$ROOT/jre/bin/java" ] || [ ! -f "$ROOT/deepep4j-examples.jar" ]; then
    echo "PART 1 IS GONE: $ROOT/jre is not here, so this is a fresh machine (the previous one was given back between"
    echo "the two runs). Nothing was tested. Start again from run 1 (unpack1), then issue run 2 at once."
    exit 3
  fi
  echo "part 1 is still unpacked in $ROOT: same machine as run 1"
  xz -dc "$part2/part2.tar.xz" | tar -C "$ROOT/lib" -xf -
  mkdir -p "$out"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt" || true
  local java="$ROOT/jre/bin/java -Xmx48g -Dorg.bytedeco.javacpp.maxbytes=0 -Dorg.bytedeco.javacpp.maxphysicalbytes=0"
  local cp="$ROOT/lib/*"
  # EAGER: ranks sharing one GPU must not load a kernel lazily inside a step (README, "Two ranks on one GPU");
  # 32 connections: stream-ordered ranks sharing one GPU each need hardware queues of their own
  export NCCL_NVLS_ENABLE=0 NVSHMEM_DISABLE_NVLS=1 CUDA_MODULE_LOADING=EAGER CUDA_DEVICE_MAX_CONNECTIONS=32 \
      LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
  local rc=0
  echo "== GPU-tagged JUnit tests"
  # EpBufferGpuTest: host arrays, device arrays, stream-ordered steps, reused outputs and SameDiff ops on CUDA vs the
  # CPU (1 rank, 2 ranks on one GPU); EngineBlockGpuTest: the MoELayer engine block on CUDA vs the Java CPU path (EP1,
  # EP2 sharing the GPU)
  timeout 180 $java -Dopexec=org.deepep4j.samediff.DeepEpExecutioner -jar "$ROOT/tests/junit-platform-console-standalone-1.10.2.jar" \
      execute --class-path "$ROOT/tests/nd4j-deepep-ops-tests.jar:$ROOT/tests/dl4j-moe-layer-tests.jar:$(ls "$ROOT"/lib/*.jar | tr '\n' ':')" \
      --select-class org.deepep4j.EpBufferGpuTest --select-class org.deepep4j.moe.engine.EngineBlockGpuTest \
      --details=tree --disable-banner 2>&1 | tee "$out/gpu-tests.log" || rc=1
  echo "== MoELayer training step, Java CPU path vs engine block on the GPU: the 2048-wide shape, 2 ranks sharing the GPU"
  bench() {
    timeout 150 $java -cp "$cp:$ROOT/tests/dl4j-moe-layer-tests.jar" org.deepep4j.moe.bench.EngineStepBenchmark "$@" 2>&1 \
        | grep -v ' INFO ' | tee -a "$out/bench.log"
  }
  bench 2048 768 64 8 2 4096 3 engine-cuda,java-cpu || rc=1
  echo "== a rank's queue copies by copy threads (CUDA, 32 MB)"
  timeout 25 $java -cp "$cp:$ROOT/tests/nd4j-deepep-ops-tests.jar" org.deepep4j.StagingBenchmark copy 32 1,2,4,8 \
      2>&1 | grep -v ' INFO ' | tee -a "$out/staging.log" || rc=1
  echo "== main job, --device cuda"
  (cd "$ROOT" && timeout 60 $java -jar deepep4j-examples.jar --device cuda --out "$ROOT/out") 2>&1 | tee "$out/main-cuda.log" || rc=1
  echo "== MoELayer training step at the example's shape"
  bench 64 128 8 2 2 512 10 java-cpu,engine-cpu,engine-cuda || rc=1
  echo "== EpBuffer on CUDA: host arrays (staged; fresh / reused outputs) vs device arrays"
  for ranks in 1 2; do
    timeout 40 $java -cp "$cp:$ROOT/tests/nd4j-deepep-ops-tests.jar" org.deepep4j.StagingBenchmark 2048 4096 64 8 $ranks 5 \
        2>&1 | grep -v ' INFO ' | tee -a "$out/staging.log" || rc=1
  done
  return $rc
}

case "${1:-}" in
  pack) shift; pack "$@" ;;
  unpack1) shift; unpack1 "$@" ;;
  run) shift; run "$@" ;;
  *) sed -n '2,15p' "$0"; exit 2 ;;
esac

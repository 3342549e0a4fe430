package org.deepep4j;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.time.Duration;
import java.util.Collections;
import java.util.Map;
import java.util.Random;
import org.deepep4j.natives.DeepEp4jNative;
import org.deepep4j.samediff.DeepEp;
import org.deepep4j.samediff.EpDispatchVars;
import org.junit.jupiter.api.Assumptions;
import org.junit.jupiter.api.BeforeAll;
import org.junit.jupiter.api.BeforeEach;
import org.junit.jupiter.api.Tag;
import org.junit.jupiter.params.ParameterizedTest;
import org.junit.jupiter.params.provider.ValueSource;
import org.nd4j.autodiff.samediff.SDVariable;
import org.nd4j.autodiff.samediff.SameDiff;
import org.nd4j.linalg.api.buffer.DataType;
import org.nd4j.linalg.api.ndarray.INDArray;
import org.nd4j.linalg.factory.Nd4j;

/**
 * EpBuffer on CUDA against the CPU reference: host INDArrays staged by the engine, device arrays, and the SameDiff
 * ops, with 1 rank and with 2 ranks sharing GPU 0 (in-process ranks go to GPU r mod count). Dispatch must equal the
 * CPU bit for bit, combine within fp32 rounding. Skipped, with the reason printed, where the engine sees no GPU (CI);
 * run on the GPU machine by examples/scripts/gpu-java.sh (with CUDA_MODULE_LOADING=EAGER for the shared GPU).
 */
@Tag("gpu")
class EpBufferGpuTest {
  private static final double EPS = 1e-5;

  @BeforeAll
  static void install() {
    DeepEp.install();
  }

  @BeforeEach
  void needsGpu() {
    int n = DeepEp4jNative.deepep4j_cuda_device_count();
    String why = "skipped: deepep4j_cuda_device_count() = 0 (no GPU, or libdeepep4j.so built without CUDA)";
    if (n == 0) System.out.println("EpBufferGpuTest " + why);
    Assumptions.assumeTrue(n > 0, why);
  }

  @ParameterizedTest
  @ValueSource(ints = {1, 2})
  void hostArraysOnCudaMatchTheCpu(int ranks) {
    RoundTripCase.assertSame(RoundTripCase.run(ranks, EpDevice.CPU, false), RoundTripCase.run(ranks, EpDevice.CUDA, false),
        EPS, "CUDA host arrays vs CPU, " + ranks + " ranks");
  }

  @ParameterizedTest
  @ValueSource(ints = {1, 2})
  void deviceArraysOnCudaMatchTheCpu(int ranks) {
    RoundTripCase.assertSame(RoundTripCase.run(ranks, EpDevice.CPU, false), RoundTripCase.run(ranks, EpDevice.CUDA, true),
        EPS, "CUDA device arrays vs CPU, " + ranks + " ranks");
  }

  /**
   * Stream-ordered steps: device-array dispatch / combine only queue (results read after the queued work, as
   * toHost waits for it) and host arrays return complete; both equal the CPU reference.
   */
  @ParameterizedTest
  @ValueSource(ints = {1, 2})
  void streamOrderedStepsMatchTheCpu(int ranks) {
    EpConfig so = EpConfig.builder().device(EpDevice.CUDA).cudaTransfer(EpConfig.CudaTransfer.SM).streamOrdered(true)
        .bufferSizeGb(1.0 / 32).timeout(Duration.ofSeconds(30)).build();
    try (EpGroup g = EpGroup.inProcess(1); EpBuffer b = g.buffer(0, so)) {
      assertTrue(b.isStreamOrdered());
      b.sync();
    }
    RoundTripCase.Result cpu = RoundTripCase.run(ranks, EpDevice.CPU, false);
    RoundTripCase.assertSame(cpu, RoundTripCase.run(ranks, so, true), EPS, "stream-ordered device arrays vs CPU, " + ranks + " ranks");
    RoundTripCase.assertSame(cpu, RoundTripCase.run(ranks, so, false), EPS, "stream-ordered host arrays vs CPU, " + ranks + " ranks");
  }

  /** Outputs reused step after step through the pinned staging (3 copy threads): each step's values, never stale. */
  @ParameterizedTest
  @ValueSource(ints = {1, 2})
  void reusedOutputsHoldEachStepsValuesOnCuda(int ranks) {
    OutputReuseCase.buffersReuseOutputs(ranks, EpDevice.CUDA);
    if (ranks == 2) OutputReuseCase.aliasedOutputIsRefusedOnEveryRank(EpDevice.CUDA);
  }

  @org.junit.jupiter.api.Test
  void moeBlockWritesIntoGivenOutputsOnCuda() {
    MoeOutputReuseCase.run(EpDevice.CUDA);
  }

  @ParameterizedTest
  @ValueSource(ints = {1, 2})
  void sameDiffOpsOnCudaMatchTheCpu(int ranks) {
    INDArray[][] cpu = sameDiffStep(ranks, EpDevice.CPU), gpu = sameDiffStep(ranks, EpDevice.CUDA);
    for (int r = 0; r < ranks; ++r)
      for (int i = 0; i < 3; ++i)
        assertTrue(cpu[r][i].equalsWithEps(gpu[r][i], EPS), "rank " + r + " " + new String[] {"out", "dx", "dw"}[i]
            + ": " + cpu[r][i] + " vs " + gpu[r][i]);
  }

  /** Per rank: out, d loss / dx, d loss / dw of out = combine(3 * dispatch(x, w)), loss = sum(out * c). */
  private static INDArray[][] sameDiffStep(int ranks, EpDevice device) {
    int n = 9, h = 16, k = 2, experts = 4 * ranks;
    INDArray[][] res = new INDArray[ranks][];
    EpConfig config = EpConfig.builder().device(device).bufferSizeGb(1.0 / 64).timeout(Duration.ofSeconds(30)).build();
    try (EpGroup group = EpGroup.inProcess(ranks)) {
      group.runOnAllRanks(rank -> {
        Random rnd = new Random(31 + rank);
        long[] idx = new long[n * k];
        for (int i = 0; i < idx.length; ++i) idx[i] = rnd.nextInt(5) == 0 ? -1 : rnd.nextInt(experts);
        Nd4j.getRandom().setSeed(41 + rank);
        INDArray xv = Nd4j.rand(DataType.FLOAT, n, h).subi(0.5), wv = Nd4j.rand(DataType.FLOAT, n, k);
        INDArray cv = Nd4j.rand(DataType.FLOAT, n, h);
        try (EpBuffer buf = group.buffer(rank, config)) {
          SameDiff sd = SameDiff.create();
          SDVariable x = sd.var("x", xv), w = sd.var("w", wv);
          EpDispatchVars d = DeepEp.of(sd).dispatch(buf, x, sd.constant(Nd4j.createFromArray(idx).reshape(n, k)), w, experts);
          SDVariable out = DeepEp.of(sd).combine(d, d.recvX().mul(3.0), d.recvTopkWeights()).rename("out");
          out.mul(sd.constant(cv)).sum().rename("loss");
          sd.setLossVariables("loss");
          INDArray o = sd.output(Collections.emptyMap(), "out").get("out");
          Map<String, INDArray> g = sd.calculateGradients(Collections.emptyMap(), "x", "w");
          res[rank] = new INDArray[] {o, g.get("x"), g.get("w")};
          assertEquals(n, o.size(0));
        }
        return null;
      }, Duration.ofSeconds(120));
    }
    return res;
  }
}

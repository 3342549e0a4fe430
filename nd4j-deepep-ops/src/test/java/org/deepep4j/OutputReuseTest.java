package org.deepep4j;

import org.junit.jupiter.api.Test;
import org.junit.jupiter.params.ParameterizedTest;
import org.junit.jupiter.params.provider.ValueSource;

/** Caller-provided outputs on the CPU device (the same cases run on CUDA in {@code EpBufferGpuTest}). */
class OutputReuseTest {
  @ParameterizedTest
  @ValueSource(ints = {1, 2})
  void reusedOutputsHoldEachStepsValues(int ranks) {
    OutputReuseCase.buffersReuseOutputs(ranks, EpDevice.CPU);
  }

  @Test
  void anOutputAliasingAnInputIsRefusedOnEveryRank() {
    OutputReuseCase.aliasedOutputIsRefusedOnEveryRank(EpDevice.CPU);
  }

  @Test
  void moeBlockWritesIntoGivenOutputs() {
    MoeOutputReuseCase.run(EpDevice.CPU);
  }
}

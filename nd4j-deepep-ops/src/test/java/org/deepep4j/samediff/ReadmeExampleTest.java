package org.deepep4j.samediff;

import static org.junit.jupiter.api.Assertions.assertEquals;

import java.time.Duration;
import java.util.Collections;
import org.deepep4j.EpBuffer;
import org.deepep4j.EpConfig;
import org.deepep4j.EpGroup;
import org.junit.jupiter.api.Test;
import org.nd4j.autodiff.samediff.SDVariable;
import org.nd4j.autodiff.samediff.SameDiff;
import org.nd4j.linalg.api.buffer.DataType;
import org.nd4j.linalg.api.ndarray.INDArray;
import org.nd4j.linalg.factory.Nd4j;

/** The SameDiff example of the README, kept compiling and running. */
class ReadmeExampleTest {
  @Test
  void readmeExampleRuns() {
    DeepEp.install();
    // --- README example begins
    try (EpGroup group = EpGroup.inProcess(2)) {
      group.runOnAllRanks(rank -> {
        try (EpBuffer buf = group.buffer(rank, EpConfig.builder().bufferSizeGb(0.01).build())) {
          SameDiff sd = SameDiff.create();
          SDVariable x = sd.var("x", Nd4j.rand(DataType.FLOAT, 16, 64));
          SDVariable topk = sd.constant(Nd4j.createFromArray(new long[16][2]).addi(rank * 3 % 4));
          EpDispatchVars d = DeepEp.of(sd).dispatch(buf, x, topk, null, 4);   // 4 experts, 2 per rank
          SDVariable y = d.recvX().mul(2.0);                                  // the experts' work
          SDVariable out = DeepEp.of(sd).combine(d, y).rename("out");
          out.sum().rename("loss");
          sd.setLossVariables("loss");
          INDArray dx = sd.calculateGradients(Collections.emptyMap(), "x").get("x");
          // --- README example ends
          assertEquals(Nd4j.valueArrayOf(new long[] {16, 64}, 2.0f), dx);
          assertEquals(sd.getArrForVarName("x").mul(2), sd.output(Collections.emptyMap(), "out").get("out"));
        }
        return null;
      }, Duration.ofSeconds(60));
    }
  }
}

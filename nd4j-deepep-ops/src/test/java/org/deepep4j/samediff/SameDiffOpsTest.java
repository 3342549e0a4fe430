package org.deepep4j.samediff;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.time.Duration;
import java.util.Collections;
import java.util.HashMap;
import java.util.Map;
import java.util.Random;
import org.deepep4j.EpBuffer;
import org.deepep4j.EpConfig;
import org.deepep4j.EpDispatchResult;
import org.deepep4j.EpGroup;
import org.junit.jupiter.api.BeforeAll;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.params.ParameterizedTest;
import org.junit.jupiter.params.provider.ValueSource;
import org.nd4j.autodiff.samediff.SDVariable;
import org.nd4j.autodiff.samediff.SameDiff;
import org.nd4j.autodiff.validation.GradCheckUtil;
import org.nd4j.linalg.api.buffer.DataType;
import org.nd4j.linalg.api.ndarray.INDArray;
import org.nd4j.linalg.factory.Nd4j;

class SameDiffOpsTest {
  static final EpConfig SMALL = EpConfig.builder().bufferSizeGb(1.0 / 64).numSms(4).ringTokens(8).maxSendTokensPerChunk(4)
      .timeout(Duration.ofSeconds(20)).build();

  @BeforeAll
  static void install() {
    DeepEp.install();
  }

  static long[] topk(int n, int k, int experts, long seed) {
    Random rnd = new Random(seed);
    long[] t = new long[n * k];
    for (int i = 0; i < t.length; ++i) t[i] = rnd.nextInt(5) == 0 ? -1 : rnd.nextInt(experts);
    return t;
  }

  /**
   * Per rank: out = weighted combine of 3 * dispatch(x), loss = sum(out * c). Plain-Java reference: out[n] =
   * 3 S[n] x[n] with S[n] the sum of token n's weights on existing experts; d x[n] = 3 S[n] c[n];
   * d w[n, j] = 3 (x[n] . c[n]) for existing experts, 0 for -1.
   */
  @ParameterizedTest
  @ValueSource(ints = {1, 2, 4})
  void forwardAndBackwardMatchPlainJava(int ranks) {
    int n = 7, h = 8, k = 3, experts = 2 * ranks;
    try (EpGroup group = EpGroup.inProcess(ranks)) {
      group.runOnAllRanks(rank -> {
        try (EpBuffer buf = group.buffer(rank, SMALL)) {
          long[] idx = topk(n, k, experts, 11 + rank);
          INDArray xv = Nd4j.rand(DataType.FLOAT, n, h).subi(0.5);
          INDArray wv = Nd4j.rand(DataType.FLOAT, n, k);
          INDArray cv = Nd4j.rand(DataType.FLOAT, n, h);
          SameDiff sd = SameDiff.create();
          SDVariable x = sd.var("x", xv);
          SDVariable w = sd.var("w", wv);
          EpDispatchVars d = DeepEp.of(sd).dispatch(buf, x, sd.constant(Nd4j.create(idx, new long[] {n, k}, DataType.LONG)), w, experts);
          SDVariable out = DeepEp.of(sd).combine(d, d.recvX().mul(3.0), d.recvTopkWeights()).rename("out");
          out.mul(sd.constant(cv)).sum().rename("loss");
          sd.setLossVariables("loss");

          INDArray got = sd.output(Collections.emptyMap(), "out").get("out");
          Map<String, INDArray> grads = sd.calculateGradients(Collections.emptyMap(), "x", "w");
          for (int t = 0; t < n; ++t) {
            double s = 0;
            for (int j = 0; j < k; ++j) if (idx[t * k + j] >= 0) s += wv.getDouble(t, j);
            double dot = xv.getRow(t).mul(cv.getRow(t)).sumNumber().doubleValue();
            for (int c = 0; c < h; ++c) {
              assertEquals(3 * s * xv.getDouble(t, c), got.getDouble(t, c), 1e-5, "rank " + rank + " out[" + t + "," + c + "]");
              assertEquals(3 * s * cv.getDouble(t, c), grads.get("x").getDouble(t, c), 1e-5, "rank " + rank + " dx[" + t + "," + c + "]");
            }
            for (int j = 0; j < k; ++j)
              assertEquals(idx[t * k + j] >= 0 ? 3 * dot : 0, grads.get("w").getDouble(t, j), 1e-4, "rank " + rank + " dw[" + t + "," + j + "]");
          }
        }
        return null;
      }, Duration.ofSeconds(60));
    }
  }

  @ParameterizedTest
  @ValueSource(strings = {"FLOAT", "BFLOAT16", "HALF"})
  void eagerOpsEqualTheBufferApi(String type) {
    DataType dtype = DataType.valueOf(type);
    try (EpGroup group = EpGroup.inProcess(2)) {
      group.runOnAllRanks(rank -> {
        try (EpBuffer buf = group.buffer(rank, SMALL)) {
          INDArray x = Nd4j.rand(DataType.FLOAT, 6, 8).castTo(dtype);
          INDArray idx = Nd4j.create(topk(6, 2, 4, rank), new long[] {6, 2}, DataType.LONG);
          EpDispatchOp op = new EpDispatchOp(x, idx, null, buf.id(), 4);
          INDArray[] viaOp = Nd4j.exec(op);
          EpDispatchResult viaApi = buf.dispatch(x, idx, null, 4);
          assertEquals(viaApi.recvX(), viaOp[0]);
          assertEquals(viaApi.recvTopkIdx(), viaOp[1]);
          assertEquals(2, viaOp.length);
          assertEquals(dtype, viaOp[0].dataType());
          viaApi.handle().close();
        }
        return null;
      }, Duration.ofSeconds(60));
    }
  }

  /** dispatch -> one linear map per expert (applied to the rows that chose it) -> combine, by finite differences. */
  @Test
  void gradientCheckThroughPerExpertLinear() {
    int n = 4, h = 4, k = 2, experts = 2;
    try (EpGroup group = EpGroup.inProcess(1); EpBuffer buf = group.buffer(0, SMALL)) {
      Nd4j.getRandom().setSeed(5);
      long[] idx = {0, 1, 1, -1, 0, 0, -1, 1};
      SameDiff sd = SameDiff.create();
      SDVariable x = sd.var("x", Nd4j.rand(DataType.FLOAT, n, h).subi(0.5));
      SDVariable w = sd.var("w", Nd4j.rand(DataType.FLOAT, n, k).addi(0.5));
      EpDispatchVars d = DeepEp.of(sd).dispatch(buf, x, sd.constant(Nd4j.create(idx, new long[] {n, k}, DataType.LONG)), w, experts);
      SDVariable y = null;
      for (int e = 0; e < experts; ++e) {
        SDVariable we = sd.var("W" + e, Nd4j.rand(DataType.FLOAT, h, h).subi(0.5));
        SDVariable chose = d.recvTopkIdx().eq((double) e).castTo(DataType.FLOAT).sum(true, 1);  // [M, 1]
        SDVariable ye = d.recvX().mmul(we).mul(chose);
        y = y == null ? ye : y.add(ye);
      }
      SDVariable out = DeepEp.of(sd).combine(d, y, d.recvTopkWeights());
      out.mul(out).sum().rename("loss");
      sd.setLossVariables("loss");
      sd.createGradFunction();
      DataType before = Nd4j.dataType();
      Nd4j.setDefaultDataTypes(DataType.DOUBLE, DataType.DOUBLE);  // GradCheckUtil insists; our graph stays fp32
      try {
        assertTrue(GradCheckUtil.checkGradients(sd, new HashMap<>(), 5e-3, 5e-2, 5e-3, false, false, true, false, null, null));
      } finally {
        Nd4j.setDefaultDataTypes(before, before);
      }
    }
  }
}

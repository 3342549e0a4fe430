package org.deepep4j;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.time.Duration;
import java.util.Random;
import org.nd4j.linalg.api.buffer.DataType;
import org.nd4j.linalg.api.ndarray.INDArray;
import org.nd4j.linalg.factory.Nd4j;

/**
 * One step of every kind on R in-process ranks — dispatch with weights, weighted combine, cached dispatch (backward of
 * combine), unweighted combine — on a given device, with host INDArrays or with {@link EpDeviceArray}s. The same seeds
 * give the same inputs everywhere, so the results of any two devices / forms can be compared.
 */
final class RoundTripCase {
  static final int HIDDEN = 64, TOPK = 2;

  /** Per rank: received rows, ids, weights; the weighted combine; the cached dispatch of it; the plain combine. */
  record Result(INDArray[] recvX, INDArray[] recvIdx, INDArray[] recvW, INDArray[] weighted, INDArray[] back,
                INDArray[] plain) {}

  private RoundTripCase() {}

  static Result run(int ranks, EpDevice device, boolean deviceArrays) {
    return run(ranks, EpConfig.builder().device(device).bufferSizeGb(1.0 / 32).timeout(Duration.ofSeconds(30)).build(),
        deviceArrays);
  }

  static Result run(int ranks, EpConfig config, boolean deviceArrays) {
    int experts = 4 * ranks;
    Result res = new Result(new INDArray[ranks], new INDArray[ranks], new INDArray[ranks], new INDArray[ranks],
        new INDArray[ranks], new INDArray[ranks]);
    try (EpGroup group = EpGroup.inProcess(ranks)) {
      group.runOnAllRanks(rank -> {
        int n = 40 + 13 * rank;
        Random rnd = new Random(100 + rank);
        long[] idx = new long[n * TOPK];
        float[] w = new float[n * TOPK];
        for (int i = 0; i < idx.length; ++i) {
          idx[i] = rnd.nextInt(6) == 0 ? -1 : rnd.nextInt(experts);
          w[i] = rnd.nextFloat();
        }
        Nd4j.getRandom().setSeed(200 + rank);
        INDArray x = Nd4j.rand(DataType.FLOAT, n, HIDDEN).subi(0.5);
        INDArray topk = Nd4j.createFromArray(idx).reshape(n, TOPK);
        INDArray weights = Nd4j.createFromArray(w).reshape(n, TOPK);
        try (EpBuffer buf = group.buffer(rank, config)) {
          if (deviceArrays) runOnDevice(buf, x, topk, weights, experts, res);
          else runOnHost(buf, x, topk, weights, experts, res);
        }
        return null;
      }, Duration.ofSeconds(120));
    }
    return res;
  }

  private static void runOnHost(EpBuffer buf, INDArray x, INDArray topk, INDArray w, int experts, Result res) {
    int r = buf.rank();
    EpDispatchResult d = buf.dispatch(x, topk, w, experts);
    res.recvX()[r] = d.recvX();
    res.recvIdx()[r] = d.recvTopkIdx();
    res.recvW()[r] = d.recvTopkWeights();
    res.weighted()[r] = buf.combine(d.recvX(), d.handle(), d.recvTopkWeights());
    res.back()[r] = buf.dispatch(res.weighted()[r], d.handle());
    res.plain()[r] = buf.combine(res.back()[r], d.handle());
    d.handle().close();
  }

  private static void runOnDevice(EpBuffer buf, INDArray x, INDArray topk, INDArray w, int experts, Result res) {
    int r = buf.rank();
    try (EpDeviceArray xd = buf.toDevice(x); EpDeviceArray idxd = buf.toDevice(topk); EpDeviceArray wd = buf.toDevice(w)) {
      EpDeviceDispatchResult d = buf.dispatch(xd, idxd, wd, experts);
      try (EpDeviceArray weighted = buf.combine(d.recvX(), d.handle(), d.recvTopkWeights());
           EpDeviceArray back = buf.dispatch(weighted, d.handle());
           EpDeviceArray plain = buf.combine(back, d.handle(), null)) {
        res.recvX()[r] = d.recvX().toHost();
        res.recvIdx()[r] = d.recvTopkIdx().toHost();
        res.recvW()[r] = d.recvTopkWeights().toHost();
        res.weighted()[r] = weighted.toHost();
        res.back()[r] = back.toHost();
        res.plain()[r] = plain.toHost();
      } finally {
        d.recvX().close();
        d.recvTopkIdx().close();
        d.recvTopkWeights().close();
        d.handle().close();
      }
    }
  }

  /** Dispatch bit for bit; combines (fp32 sums, maybe in another order) within {@code eps}. */
  static void assertSame(Result expected, Result actual, double eps, String what) {
    for (int r = 0; r < expected.recvX().length; ++r) {
      String at = what + ", rank " + r;
      assertEquals(expected.recvX()[r], actual.recvX()[r], at + ": recvX");
      assertEquals(expected.recvIdx()[r], actual.recvIdx()[r], at + ": recvTopkIdx");
      assertEquals(expected.recvW()[r], actual.recvW()[r], at + ": recvTopkWeights");
      assertTrue(expected.recvX()[r].size(0) > 0, at + ": the case must move rows");
      assertTrue(expected.weighted()[r].equalsWithEps(actual.weighted()[r], eps), at + ": weighted combine");
      assertTrue(expected.back()[r].equalsWithEps(actual.back()[r], eps), at + ": cached dispatch");
      assertTrue(expected.plain()[r].equalsWithEps(actual.plain()[r], eps), at + ": combine");
    }
  }
}

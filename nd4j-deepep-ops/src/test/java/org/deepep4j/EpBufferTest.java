package org.deepep4j;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertNull;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.time.Duration;
import java.util.List;
import java.util.Random;
import org.junit.jupiter.params.ParameterizedTest;
import org.junit.jupiter.params.provider.CsvSource;
import org.junit.jupiter.api.Test;
import org.nd4j.linalg.api.buffer.DataType;
import org.nd4j.linalg.api.ndarray.INDArray;
import org.nd4j.linalg.factory.Nd4j;

class EpBufferTest {
  static final EpConfig SMALL = EpConfig.builder().bufferSizeGb(1.0 / 64).numSms(4).ringTokens(8).maxSendTokensPerChunk(4)
      .timeout(Duration.ofSeconds(20)).build();

  static long[][] randomTopk(int ranks, int[] tokens, int k, int experts, long seed) {
    Random rnd = new Random(seed);
    long[][] t = new long[ranks][];
    for (int r = 0; r < ranks; ++r) {
      t[r] = new long[tokens[r] * k];
      for (int i = 0; i < t[r].length; ++i) t[r][i] = rnd.nextInt(5) == 0 ? -1 : rnd.nextInt(experts);
    }
    return t;
  }

  @ParameterizedTest
  @CsvSource({"1,FLOAT", "2,FLOAT", "4,FLOAT", "2,BFLOAT16", "2,HALF"})
  void dispatchCombineMatchReference(int ranks, DataType dtype) {
    int h = 32, k = 3, experts = 4 * ranks;
    int[] tokens = new int[ranks];
    for (int r = 0; r < ranks; ++r) tokens[r] = r == ranks - 1 && ranks > 1 ? 0 : 17 + 5 * r;  // N = 0 on the last rank
    long[][] topk = randomTopk(ranks, tokens, k, experts, 7 + ranks);
    INDArray[] xs = new INDArray[ranks];
    INDArray[] ws = new INDArray[ranks];
    Random rnd = new Random(3);
    for (int r = 0; r < ranks; ++r) {
      xs[r] = tokens[r] == 0 ? Nd4j.create(dtype, 0, h) : Nd4j.rand(DataType.FLOAT, tokens[r], h).subi(0.5).castTo(dtype);
      float[] w = new float[tokens[r] * k];
      for (int i = 0; i < w.length; ++i) w[i] = rnd.nextFloat();
      ws[r] = tokens[r] == 0 ? Nd4j.create(DataType.FLOAT, 0, k) : Nd4j.create(w, new long[] {tokens[r], k}, DataType.FLOAT);
    }
    try (EpGroup group = EpGroup.inProcess(ranks)) {
      group.runOnAllRanks(rank -> {
        try (EpBuffer buf = group.buffer(rank, SMALL)) {
          INDArray idx = tokens[rank] == 0 ? Nd4j.create(DataType.LONG, 0, k)
                                           : Nd4j.create(topk[rank], new long[] {tokens[rank], k}, DataType.LONG);
          EpDispatchResult d = buf.dispatch(xs[rank], idx, ws[rank], experts);
          List<int[]> expect = Reference.received(topk, k, experts, ranks, rank);
          assertEquals(expect.size(), d.recvX().size(0), "rank " + rank + " received rows");
          assertEquals(dtype, d.recvX().dataType());
          int perRank = experts / ranks;
          for (int m = 0; m < expect.size(); ++m) {
            int s = expect.get(m)[0], t = expect.get(m)[1];
            assertEquals(xs[s].getRow(t), d.recvX().getRow(m), "rank " + rank + " row " + m);
            for (int j = 0; j < k; ++j) {
              long e = topk[s][t * k + j];
              long local = e >= 0 && e / perRank == rank ? e - (long) rank * perRank : -1;
              assertEquals(local, d.recvTopkIdx().getLong(m, j));
              assertEquals(local >= 0 ? ws[s].getFloat(t, j) : 0f, d.recvTopkWeights().getFloat(m, j), 0f);
            }
          }
          // unweighted combine: x times the number of ranks visited
          INDArray out = buf.combine(d.recvX(), d.handle());
          for (int t = 0; t < tokens[rank]; ++t) {
            int c = Reference.ranksVisited(topk[rank], k, t, experts, ranks);
            INDArray expected = xs[rank].getRow(t).castTo(DataType.FLOAT).mul(c);
            assertTrue(expected.equalsWithEps(out.getRow(t).castTo(DataType.FLOAT), dtype == DataType.FLOAT ? 1e-5 : 2e-2),
                "rank " + rank + " token " + t + ": " + out.getRow(t) + " vs " + expected);
          }
          // weighted combine: x times the sum of its weights on experts that exist
          INDArray weighted = buf.combine(d.recvX(), d.handle(), d.recvTopkWeights());
          for (int t = 0; t < tokens[rank]; ++t) {
            double s = 0;
            for (int j = 0; j < k; ++j) if (topk[rank][t * k + j] >= 0) s += ws[rank].getFloat(t, j);
            INDArray expected = xs[rank].getRow(t).castTo(DataType.FLOAT).mul(s);
            assertTrue(expected.equalsWithEps(weighted.getRow(t).castTo(DataType.FLOAT), dtype == DataType.FLOAT ? 1e-4 : 3e-2));
          }
          // cached dispatch (backward of combine) reproduces the rows of the first dispatch
          INDArray again = buf.dispatch(xs[rank], d.handle());
          assertEquals(d.recvX(), again);
          d.handle().close();
        }
        return null;
      }, Duration.ofSeconds(60));
    }
  }

  @Test
  void combineReturnsTopkValuesAndLayoutCounts() {
    int ranks = 2, k = 2, experts = 4, n = 6, h = 8;
    long[][] topk = {{0, 3, 1, -1, 2, 3, -1, -1, 0, 1, 3, 2}, {1, 2, 0, 0, 3, -1, 2, 2, -1, 3, 1, 0}};
    try (EpGroup group = EpGroup.inProcess(ranks)) {
      group.runOnAllRanks(rank -> {
        try (EpBuffer buf = group.buffer(rank, SMALL)) {
          INDArray idx = Nd4j.create(topk[rank], new long[] {n, k}, DataType.LONG);
          EpLayout layout = buf.layout(idx, experts);
          int[] perRank = new int[ranks];
          for (int t = 0; t < n; ++t)
            for (int r = 0; r < ranks; ++r) {
              boolean in = false;
              for (int j = 0; j < k; ++j) in |= topk[rank][t * k + j] >= 0 && topk[rank][t * k + j] / 2 == r;
              assertEquals(in, layout.isTokenInRank(t, r));
              if (in) perRank[r]++;
            }
          assertArrayEquals(perRank, layout.tokensPerRank());
          INDArray x = Nd4j.rand(DataType.FLOAT, n, h);
          INDArray w = Nd4j.rand(DataType.FLOAT, n, k);
          EpDispatchResult d = buf.dispatch(x, idx, w, experts);
          EpCombineResult c = buf.combine(d.recvX(), d.handle(), null, d.recvTopkWeights());
          // every (token, k) weight comes back from the rank owning that expert; -1 entries come back as 0
          for (int t = 0; t < n; ++t)
            for (int j = 0; j < k; ++j)
              assertEquals(topk[rank][t * k + j] >= 0 ? w.getFloat(t, j) : 0f, c.outTopkWeights().getFloat(t, j), 0f);
        }
        return null;
      }, Duration.ofSeconds(60));
    }
  }

  @Test
  void localShapeErrorIsReportedOnEveryRank() {
    int ranks = 2;
    try (EpGroup group = EpGroup.inProcess(ranks)) {
      List<Object> results = group.runOnAllRanks(rank -> {
        try (EpBuffer buf = group.buffer(rank, SMALL)) {
          INDArray x = Nd4j.rand(DataType.FLOAT, 4, 8);
          INDArray idx = Nd4j.zeros(DataType.LONG, rank == 0 ? 3 : 4, 2);  // rank 0 disagrees with its own x
          RuntimeException e = assertThrows(RuntimeException.class, () -> buf.dispatch(x, idx, null, 4));
          INDArray outAfter = buf.dispatch(x, Nd4j.zeros(DataType.LONG, 4, 2), null, 4).recvX();  // still usable
          assertEquals(rank == 0 ? 8 : 0, outAfter.size(0));
          return e;
        }
      }, Duration.ofSeconds(60));
      RuntimeException e0 = (RuntimeException) results.get(0), e1 = (RuntimeException) results.get(1);
      assertTrue(e0 instanceof IllegalArgumentException, e0.toString());
      assertTrue(e0.getMessage().contains("topkIdx shape = [3, 2]"), e0.getMessage());
      assertTrue(e1.getMessage().contains("rank 0 reported") && e1.getMessage().contains("topkIdx shape = [3, 2]"), e1.getMessage());
    }
  }

  @Test
  void nativeErrorsNameArgumentValueAndRule() {
    try (EpGroup group = EpGroup.inProcess(2)) {
      List<Object> results = group.runOnAllRanks(rank -> {
        try (EpBuffer buf = group.buffer(rank, SMALL)) {
          INDArray x = Nd4j.rand(DataType.FLOAT, 2, 8);
          INDArray idx = Nd4j.create(new long[] {0, rank == 1 ? 9 : 1, 2, 3}, new long[] {2, 2}, DataType.LONG);
          return assertThrows(RuntimeException.class, () -> buf.dispatch(x, idx, null, 4));
        }
      }, Duration.ofSeconds(60));
      String m1 = ((RuntimeException) results.get(1)).getMessage();
      assertTrue(m1.contains("topk_idx[0,1] = 9") && m1.contains("[-1, num_experts = 4)"), m1);
      assertTrue(((RuntimeException) results.get(0)).getMessage().contains("rank 1 reported"));
    }
  }

  @Test
  void alltoallOnCpuFailsClearlyOnEveryRank() {
    EpConfig cfg = SMALL.toBuilder().dispatch(EpDispatch.ALLTOALL).build();
    try (EpGroup group = EpGroup.inProcess(2)) {
      List<Object> results = group.runOnAllRanks(rank -> assertThrows(IllegalStateException.class, () -> group.buffer(rank, cfg)),
          Duration.ofSeconds(60));
      for (Object o : results) assertTrue(((Exception) o).getMessage().contains("UNAVAILABLE"), ((Exception) o).getMessage());
    }
  }

  @Test
  void aMissingRankTimesOut() {
    EpConfig cfg = SMALL.toBuilder().timeout(Duration.ofMillis(300)).build();
    try (EpGroup group = EpGroup.inProcess(2)) {
      EpTimeoutException e = assertThrows(EpTimeoutException.class, () -> group.buffer(0, cfg));
      assertTrue(e.getMessage().contains("timed out"), e.getMessage());
    }
  }

  @Test
  void closingTheBufferFreesItsOpenHandles() {
    EpDispatchResult d;
    try (EpGroup group = EpGroup.inProcess(1); EpBuffer buf = group.buffer(0, SMALL)) {
      d = buf.dispatch(Nd4j.rand(DataType.FLOAT, 3, 8), Nd4j.zeros(DataType.LONG, 3, 1), null, 2);
      assertTrue(!d.handle().isClosed());
    }
    assertTrue(d.handle().isClosed());
    d.handle().close();  // no-op after the buffer freed it
  }

  @Test
  void closedHandleAndForeignHandleAreRejected() {
    try (EpGroup group = EpGroup.inProcess(1); EpBuffer buf = group.buffer(0, SMALL)) {
      INDArray x = Nd4j.rand(DataType.FLOAT, 3, 8);
      EpDispatchResult d = buf.dispatch(x, Nd4j.zeros(DataType.LONG, 3, 1), null, 2);
      assertNull(d.recvTopkWeights());
      assertEquals(EpDevice.CPU, buf.device());
      d.handle().close();
      IllegalArgumentException e = assertThrows(IllegalArgumentException.class, () -> buf.combine(d.recvX(), d.handle()));
      assertTrue(e.getMessage().contains("handle: already closed"), e.getMessage());
    }
  }
}

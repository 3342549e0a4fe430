package org.deepep4j;

import java.time.Duration;
import java.util.List;
import org.nd4j.linalg.api.buffer.DataType;
import org.nd4j.linalg.api.ndarray.INDArray;
import org.nd4j.linalg.factory.Nd4j;

/**
 * One rank of a multi-process group (torchrun variables). Dispatches rows with known values and checks what arrives
 * and what combine returns against the plain-Java reference; exits 0 when all matched.
 */
public final class TwoProcessPeer {
  static final int N = 9, H = 8, K = 2, E = 4;

  static long[][] topk(int ranks) {
    long[][] t = new long[ranks][N * K];
    for (int r = 0; r < ranks; ++r)
      for (int i = 0; i < N * K; ++i) t[r][i] = (i * 7 + r * 3) % 5 == 4 ? -1 : (i * 3 + r) % E;
    return t;
  }

  static INDArray x(int rank) {
    INDArray x = Nd4j.create(DataType.FLOAT, N, H);
    for (int t = 0; t < N; ++t)
      for (int c = 0; c < H; ++c) x.putScalar(t, c, rank * 1000 + t * 10 + c);
    return x;
  }

  /** Runs this process's rank; returns a description of the first mismatch, or null. */
  static String run(EpGroup group, int rank) {
    EpConfig cfg = EpConfig.builder().bufferSizeGb(1.0 / 64).numSms(4).timeout(Duration.ofSeconds(30)).build();
    int ranks = group.size();
    long[][] topk = topk(ranks);
    try (EpBuffer buf = group.buffer(rank, cfg)) {
      EpDispatchResult d = buf.dispatch(x(rank), Nd4j.create(topk[rank], new long[] {N, K}, DataType.LONG), null, E);
      List<int[]> expect = Reference.received(topk, K, E, ranks, rank);
      if (d.recvX().size(0) != expect.size()) return "rank " + rank + " received " + d.recvX().size(0) + " rows, expected " + expect.size();
      for (int m = 0; m < expect.size(); ++m)
        if (!d.recvX().getRow(m).equals(x(expect.get(m)[0]).getRow(expect.get(m)[1]))) return "rank " + rank + " row " + m + " differs";
      INDArray out = buf.combine(d.recvX(), d.handle());
      for (int t = 0; t < N; ++t) {
        int c = Reference.ranksVisited(topk[rank], K, t, E, ranks);
        if (!out.getRow(t).equals(x(rank).getRow(t).mul(c))) return "rank " + rank + " combined token " + t + " differs";
      }
      d.handle().close();
    }
    return null;
  }

  public static void main(String[] args) {
    try (EpGroup group = EpGroup.fromEnvironment()) {
      String bad = run(group, group.processRank());
      System.out.println(bad == null ? "PEER OK" : "PEER MISMATCH: " + bad);
      System.exit(bad == null ? 0 : 1);
    }
  }
}

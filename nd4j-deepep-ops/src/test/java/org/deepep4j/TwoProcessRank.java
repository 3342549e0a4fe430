package org.deepep4j;

import java.time.Duration;
import java.util.Random;
import org.nd4j.linalg.api.buffer.DataType;
import org.nd4j.linalg.api.ndarray.INDArray;
import org.nd4j.linalg.factory.Nd4j;

/**
 * One rank of a multi-process group (run as its own JVM by {@link MultiProcessTest}): dispatch and combine
 * deterministic data, check combine = x times ranks visited, exit 0 on success.
 */
public final class TwoProcessRank {
  static final int H = 16, K = 2, EXPERTS = 4, N = 10;

  static INDArray topk(int rank) {
    Random rnd = new Random(100 + rank);
    long[] t = new long[N * K];
    for (int i = 0; i < t.length; ++i) t[i] = rnd.nextInt(EXPERTS + 1) - 1;
    return Nd4j.create(t, new long[] {N, K}, DataType.LONG);
  }

  static INDArray x(int rank) {
    Nd4j.getRandom().setSeed(7 + rank);
    return Nd4j.rand(DataType.FLOAT, N, H);
  }

  /** Runs this rank's step and returns the number of rows it received. */
  static long run(EpGroup group, int rank) {
    EpConfig cfg = EpConfig.builder().bufferSizeGb(1.0 / 256).numSms(2).ringTokens(4).maxSendTokensPerChunk(2)
        .timeout(Duration.ofSeconds(30)).build();
    try (EpBuffer buf = group.buffer(rank, cfg)) {
      INDArray x = x(rank), idx = topk(rank);
      EpDispatchResult d = buf.dispatch(x, idx, null, EXPERTS);
      INDArray out = buf.combine(d.recvX(), d.handle());
      for (int t = 0; t < N; ++t) {
        int visits = Reference.ranksVisited(idx.data().asLong(), K, t, EXPERTS, group.size());
        if (!x.getRow(t).mul(visits).equalsWithEps(out.getRow(t), 1e-5))
          throw new AssertionError("rank " + rank + " token " + t + ": " + out.getRow(t) + " != " + visits + " x " + x.getRow(t));
      }
      d.handle().close();
      return d.recvX().size(0);
    }
  }

  public static void main(String[] args) {
    int rank = Integer.parseInt(args[0]);
    try (EpGroup group = EpGroup.tcp(rank, Integer.parseInt(args[1]), "127.0.0.1", Integer.parseInt(args[2]), args[3],
        Duration.ofSeconds(30))) {
      System.out.println("rank " + rank + " received " + run(group, rank) + " rows: OK");
    }
    System.exit(0);
  }
}

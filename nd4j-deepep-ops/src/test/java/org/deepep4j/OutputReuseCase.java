package org.deepep4j;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertNotEquals;
import static org.junit.jupiter.api.Assertions.assertSame;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.time.Duration;
import java.util.Random;
import org.nd4j.linalg.api.buffer.DataType;
import org.nd4j.linalg.api.ndarray.INDArray;
import org.nd4j.linalg.factory.Nd4j;
import org.nd4j.linalg.indexing.NDArrayIndex;

/**
 * Caller-provided outputs reused step after step, on a given device (staged through pinned memory on CUDA): every
 * step's output must hold that step's values (equal to a fresh-output call), never the previous step's, and an
 * output sharing memory with an input is refused on every rank with the outputs untouched. Run by
 * {@code OutputReuseTest} (CPU, CI) and {@code EpBufferGpuTest} (CUDA).
 */
final class OutputReuseCase {
  static final int H = 64, K = 2;

  private OutputReuseCase() {}

  static EpConfig config(EpDevice device) {
    return EpConfig.builder().device(device).bufferSizeGb(1.0 / 32).hostCopyThreads(3).timeout(Duration.ofSeconds(30))
        .build();
  }

  /** Two steps of combine, cached dispatch and a device-array copy, each into the same output arrays. */
  static void buffersReuseOutputs(int ranks, EpDevice device) {
    int experts = 4 * ranks;
    try (EpGroup group = EpGroup.inProcess(ranks)) {
      group.runOnAllRanks(rank -> {
        int n = 700 + 37 * rank;  // rows of 256 B: ~180 KB per array, past one copy thread's slice at 3 threads
        Random rnd = new Random(5 + rank);
        long[] idx = new long[n * K];
        for (int i = 0; i < idx.length; ++i) idx[i] = rnd.nextInt(6) == 0 ? -1 : rnd.nextInt(experts);
        Nd4j.getRandom().setSeed(9 + rank);
        INDArray x = Nd4j.rand(DataType.FLOAT, n, H).subi(0.5);
        INDArray w = Nd4j.rand(DataType.FLOAT, n, K);
        try (EpBuffer buf = group.buffer(rank, config(device))) {
          EpDispatchResult d = buf.dispatch(x, Nd4j.createFromArray(idx).reshape(n, K), w, experts);
          long m = d.recvX().size(0);
          INDArray out = Nd4j.create(DataType.FLOAT, n, H), back = Nd4j.create(DataType.FLOAT, m, H);
          INDArray host = Nd4j.create(DataType.FLOAT, m, H);
          INDArray previous = null;
          for (int step = 1; step <= 2; ++step) {
            INDArray y = d.recvX().mul(step + 1);
            INDArray fresh = buf.combine(y, d.handle(), d.recvTopkWeights());
            EpCombineResult into = buf.combine(y, d.handle(), d.recvTopkWeights(), null, out, null);
            assertSame(out, into.out(), "the given output is the result");
            assertEquals(fresh, out, "rank " + rank + " step " + step + ": combine into a reused output");
            if (previous != null) assertNotEquals(previous, out, "rank " + rank + ": step 2 must not keep step 1's values");
            previous = out.dup();
            assertSame(back, buf.dispatch(fresh, d.handle(), back));
            assertEquals(buf.dispatch(fresh, d.handle()), back, "rank " + rank + " step " + step + ": cached dispatch");
            try (EpDeviceArray dev = buf.toDevice(y)) {
              assertSame(host, dev.copyTo(host));
              assertEquals(y, host, "rank " + rank + " step " + step + ": copyTo a reused host array");
            }
          }
          d.handle().close();
        }
        return null;
      }, Duration.ofSeconds(120));
    }
  }

  /** Rank 0's output shares memory with its input: IllegalArgumentException there, EpPeerException elsewhere. */
  static void aliasedOutputIsRefusedOnEveryRank(EpDevice device) {
    int ranks = 2, experts = 8, n = 24;
    try (EpGroup group = EpGroup.inProcess(ranks)) {
      group.runOnAllRanks(rank -> {
        long[] idx = new long[n * K];
        for (int i = 0; i < idx.length; ++i) idx[i] = (i * 3 + rank) % experts;
        Nd4j.getRandom().setSeed(3 + rank);
        INDArray x = Nd4j.rand(DataType.FLOAT, n, H);
        try (EpBuffer buf = group.buffer(rank, config(device))) {
          EpDispatchResult d = buf.dispatch(x, Nd4j.createFromArray(idx).reshape(n, K), null, experts);
          long m = d.recvX().size(0);
          INDArray pool = Nd4j.rand(DataType.FLOAT, Math.max(m, n) * H);
          INDArray y = pool.get(NDArrayIndex.interval(0, m * H)).reshape('c', m, H);
          INDArray out = rank == 0 ? pool.get(NDArrayIndex.interval(0, (long) n * H)).reshape('c', n, H)
                                   : Nd4j.valueArrayOf(new long[] {n, H}, 7f);
          INDArray before = out.dup();
          RuntimeException e = assertThrows(RuntimeException.class,
              () -> buf.combine(y, d.handle(), null, null, out, null));
          if (rank == 0) {
            assertEquals(IllegalArgumentException.class, e.getClass(), e.toString());
            assertTrue(e.getMessage().startsWith("out: shares memory with an input"), e.getMessage());
          } else {
            assertTrue(e instanceof EpPeerException && e.getMessage().contains("shares memory"), e.toString());
            assertEquals(before, out, "rank 1: a failed call leaves its output untouched");
          }
          // the group goes on: the same step with a separate output works on both ranks
          INDArray ok = buf.combine(y.dup(), d.handle(), null, null, Nd4j.create(DataType.FLOAT, n, H), null).out();
          assertArrayEquals(new long[] {n, H}, ok.shape());
          IllegalArgumentException shape = assertThrows(IllegalArgumentException.class,
              () -> buf.combine(y, d.handle(), null, null, Nd4j.create(DataType.DOUBLE, n, H), null));
          assertTrue(shape.getMessage().startsWith("out = DOUBLE[" + n + ", " + H + "]: an output must be FLOAT"),
              shape.getMessage());
          d.handle().close();
        }
        return null;
      }, Duration.ofSeconds(120));
    }
  }
}

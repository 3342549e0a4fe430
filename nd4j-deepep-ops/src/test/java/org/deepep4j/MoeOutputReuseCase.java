package org.deepep4j;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertNotEquals;
import static org.junit.jupiter.api.Assertions.assertSame;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.time.Duration;
import org.nd4j.linalg.api.buffer.DataType;
import org.nd4j.linalg.api.ndarray.INDArray;
import org.nd4j.linalg.factory.Nd4j;

/**
 * The MoE block's forward and backward into arrays the caller reuses every step (2 ranks): each step's y and grad x
 * equal a fresh-output call's, never the previous step's; y sharing memory with x is refused on every rank; the
 * staging totals count the staged bytes on a GPU and nothing on the CPU. Run on the CPU ({@code OutputReuseTest})
 * and on CUDA ({@code EpBufferGpuTest}).
 */
final class MoeOutputReuseCase {
  private static final int H = 64, F = 32, E = 8, K = 2, N = 600;

  private MoeOutputReuseCase() {}

  private static INDArray rand(long seed, long... shape) {
    Nd4j.getRandom().setSeed(seed);
    return Nd4j.rand(DataType.FLOAT, shape).subi(0.5);
  }

  static void run(EpDevice device) {
    try (EpGroup group = EpGroup.inProcess(2)) {
      group.runOnAllRanks(rank -> {
        try (EpBuffer buf = group.buffer(rank, OutputReuseCase.config(device));
             EpMoeBlock block = EpMoeBlock.create(buf, EpMoeConfig.builder().hidden(H).ffn(F).numExperts(E).topK(K)
                 .maxTokens(N).build())) {
          block.write(EpMoeBlock.Tensor.PARAMS, rand(10 + rank, block.tensorLength()).muli(0.3));
          INDArray wr = rand(30, H, E);
          INDArray y = Nd4j.create(DataType.FLOAT, N, H), gx = Nd4j.create(DataType.FLOAT, N, H);
          INDArray previousY = null, previousGx = null;
          for (int step = 1; step <= 2; ++step) {
            INDArray x = rand(100 * step + rank, N, H), g = rand(200 * step + rank, N, H);
            INDArray fresh = block.forward(x, wr, null, null).y();
            assertSame(y, block.forward(x, wr, null, null, y).y(), "the given y is the result's");
            assertTrue(fresh.equalsWithEps(y, 1e-6), "rank " + rank + " step " + step + ": y into a reused array");
            INDArray freshGx = block.backward(g, N, false).gradX();
            assertSame(gx, block.backward(g, N, false, gx).gradX());
            assertTrue(freshGx.equalsWithEps(gx, 1e-6), "rank " + rank + " step " + step + ": grad x into a reused array");
            if (previousY != null) {
              assertNotEquals(previousY, y, "rank " + rank + ": step 2's y must not keep step 1's values");
              assertNotEquals(previousGx, gx, "rank " + rank + ": step 2's grad x must not keep step 1's values");
            }
            previousY = y.dup();
            previousGx = gx.dup();
          }
          INDArray x = rand(7 + rank, N, H);
          INDArray xBefore = x.dup();
          RuntimeException e = assertThrows(RuntimeException.class,
              () -> block.forward(x, wr, null, null, rank == 0 ? x : Nd4j.create(DataType.FLOAT, N, H)));
          if (rank == 0) {
            assertEquals(IllegalArgumentException.class, e.getClass(), e.toString());
            assertTrue(e.getMessage().startsWith("y: shares memory with an input"), e.getMessage());
          } else {
            assertTrue(e instanceof EpPeerException && e.getMessage().contains("shares memory"), e.toString());
          }
          assertEquals(xBefore, x, "the refused call wrote nothing");
          long[] st = block.stagingStats();
          // per step and rank: x twice in, g twice in (plus router weights); y and grad x twice out
          long rows = 2L * 2 * N * H * 4;
          if (device == EpDevice.CUDA) {
            assertTrue(st[0] >= 2 * rows && st[1] >= 2 * rows && st[2] > 0, java.util.Arrays.toString(st));
          } else {
            assertEquals(0L, st[0] + st[1] + st[2], "the CPU device uses host arrays in place");
          }
        }
        return null;
      }, Duration.ofSeconds(120));
    }
  }
}

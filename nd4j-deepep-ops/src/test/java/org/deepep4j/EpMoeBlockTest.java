package org.deepep4j;

import java.time.Duration;
import java.util.List;
import org.junit.jupiter.api.Test;
import org.nd4j.linalg.api.buffer.DataType;
import org.nd4j.linalg.api.ndarray.INDArray;
import org.nd4j.linalg.factory.Nd4j;

import static org.junit.jupiter.api.Assertions.*;

/** The MoE block API on the engine's CPU device: tensors, forward (sync and async), backward, step, errors. */
class EpMoeBlockTest {

  private static final int H = 8, F = 6, E = 4, K = 2, N = 10;

  private static EpMoeConfig config() {
    return EpMoeConfig.builder().hidden(H).ffn(F).numExperts(E).topK(K).maxTokens(64).build();
  }

  private static INDArray rand(long seed, long... shape) {
    Nd4j.getRandom().setSeed(seed);
    return Nd4j.rand(DataType.FLOAT, shape).subi(0.5);
  }

  @Test
  void builderChecksEverySetting() {
    assertTrue(assertThrows(IllegalArgumentException.class, () -> EpMoeConfig.builder().hidden(0)).getMessage().contains("hidden = 0"));
    assertTrue(assertThrows(IllegalArgumentException.class, () -> EpMoeConfig.builder().topK(33)).getMessage().contains("topK = 33"));
    assertTrue(assertThrows(IllegalArgumentException.class, () -> EpMoeConfig.builder().dataType(DataType.HALF))
        .getMessage().contains("dataType = HALF"));
    assertTrue(assertThrows(IllegalArgumentException.class,
        () -> EpMoeConfig.builder().hidden(8).ffn(4).numExperts(2).topK(3).build()).getMessage().contains("topK = 3"));
    assertTrue(assertThrows(IllegalArgumentException.class, () -> EpOptimizer.builder(EpOptimizer.Kind.ADAM).weightDecay(0.1))
        .getMessage().contains("only ADAMW"));
  }

  @Test
  void twoRanksForwardBackwardStep() throws Exception {
    try (EpGroup group = EpGroup.inProcess(2)) {
      List<Void> ok = group.runOnAllRanks(rank -> {
        try (EpBuffer buf = group.buffer(rank, EpConfig.builder().bufferSizeGb(0.01).build());
             EpMoeBlock block = EpMoeBlock.create(buf, config())) {
          assertEquals(2L * 3 * H * F, block.tensorLength());
          INDArray w = rand(10 + rank, block.tensorLength());
          block.write(EpMoeBlock.Tensor.PARAMS, w);
          assertEquals(w, Nd4j.createFromArray(block.readFloats(EpMoeBlock.Tensor.PARAMS)));
          INDArray x = rand(20 + rank, N, H);
          INDArray wr = rand(30, H, E);
          EpMoeForward sync = block.forward(x, wr, null, null);
          EpMoeBlock.Pending p = block.forwardAsync(x, wr, null, null);
          EpMoeForward async = p.await();
          assertTrue(p.isDone());
          assertEquals(sync.y(), async.y(), "async combine gives the synchronous result");
          assertEquals(sync.topkIdx(), async.topkIdx());
          assertEquals(N * K, java.util.Arrays.stream(sync.expertLoad()).sum());
          assertTrue(sync.y().norm2Number().doubleValue() > 0);
          EpMoeBackward b = block.backward(rand(40 + rank, N, H), N, false);
          assertArrayEquals(new long[]{N, H}, b.gradX().shape());
          assertArrayEquals(new long[]{H, E}, b.gradRouterWeight().shape());
          float[] g = block.readFloats(EpMoeBlock.Tensor.GRADS);
          float[] before = block.readFloats(EpMoeBlock.Tensor.PARAMS);
          block.step(EpOptimizer.builder(EpOptimizer.Kind.SGD).learningRate(0.5).gradScale(0.25).build());
          float[] after = block.readFloats(EpMoeBlock.Tensor.PARAMS);
          double gnorm = 0;
          for (int i = 0; i < g.length; ++i) {
            assertEquals(before[i] - 0.5 * 0.25 * g[i], after[i], 1e-6, "SGD element " + i);
            gnorm += g[i] * (double) g[i];
          }
          assertTrue(gnorm > 0, "the backward produced expert gradients");
        }
        return null;
      }, Duration.ofSeconds(60));
      assertEquals(2, ok.size());
    }
  }

  @Test
  void badInputFailsOnEveryRank() {
    try (EpGroup group = EpGroup.inProcess(2)) {
      RuntimeException e = assertThrows(RuntimeException.class, () -> group.runOnAllRanks(rank -> {
        try (EpBuffer buf = group.buffer(rank, EpConfig.builder().bufferSizeGb(0.01).build());
             EpMoeBlock block = EpMoeBlock.create(buf, config())) {
          INDArray x = rank == 1 ? rand(1, N, H + 4) : rand(1, N, H);
          // rank 1's own check fails; rank 0 hears of it from the engine (PEER_ERROR) instead of waiting
          RuntimeException ex = assertThrows(RuntimeException.class, () -> block.forward(x, rand(2, H, E), null, null));
          assertTrue(ex.getMessage().contains("x shape"), ex.getMessage());
          throw ex;
        }
      }, Duration.ofSeconds(60)));
      assertTrue(e.getMessage().contains("x shape"), e.getMessage());
    }
  }

  @Test
  void cudaBufferWithoutGpuSaysWhatIsMissing() {
    org.junit.jupiter.api.Assumptions.assumeTrue(org.deepep4j.natives.DeepEp4jNative.deepep4j_cuda_device_count() == 0,
        "a CUDA device is visible: this test is about machines without one");
    try (EpGroup group = EpGroup.inProcess(1)) {
      IllegalStateException e = assertThrows(IllegalStateException.class,
          () -> group.buffer(0, EpConfig.builder().device(EpDevice.CUDA).bufferSizeGb(0.01).build()));
      assertTrue(e.getMessage().contains("no CUDA device") && e.getMessage().contains("no CPU fallback"), e.getMessage());
    }
  }
}

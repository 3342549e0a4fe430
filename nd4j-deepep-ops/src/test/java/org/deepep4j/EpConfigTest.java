package org.deepep4j;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.time.Duration;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.function.Executable;
import org.nd4j.linalg.api.buffer.DataType;

class EpConfigTest {
  private static void rejects(String expected, Executable e) {
    IllegalArgumentException x = assertThrows(IllegalArgumentException.class, e);
    assertTrue(x.getMessage().startsWith(expected), x.getMessage());
  }

  @Test
  void defaultsAreTheDocumentedOnes() {
    EpConfig c = EpConfig.defaults();
    assertEquals(EpDispatch.DEEPEP, c.dispatch());
    assertEquals(2.0, c.bufferSizeGb());
    assertEquals(20, c.numSms());
    assertEquals(Duration.ofSeconds(60), c.timeout());
  }

  @Test
  void everyInvalidSettingNamesSettingValueAndRule() {
    rejects("numSms = 7: must be even", () -> EpConfig.builder().numSms(7));
    rejects("numSms = 0: must be even", () -> EpConfig.builder().numSms(0));
    rejects("numSms = -2: must be even", () -> EpConfig.builder().numSms(-2));
    rejects("bufferSizeGb = 0.0: must be > 0", () -> EpConfig.builder().bufferSizeGb(0));
    rejects("bufferSizeGb = NaN: must be > 0", () -> EpConfig.builder().bufferSizeGb(Double.NaN));
    rejects("bufferSizeGb = 1.0E-9: must be at least 4096 bytes", () -> EpConfig.builder().bufferSizeGb(1e-9));
    rejects("timeout = PT0S: must be positive", () -> EpConfig.builder().timeout(Duration.ZERO));
    rejects("timeout = null: must be positive", () -> EpConfig.builder().timeout(null));
    rejects("maxSendTokensPerChunk = 0: must be >= 1", () -> EpConfig.builder().maxSendTokensPerChunk(0));
    rejects("ringTokens = 4: must be >= maxSendTokensPerChunk = 16", () -> EpConfig.builder().ringTokens(4).build());
    rejects("threads = 65: must be in [0, 64]", () -> EpConfig.builder().threads(65));
    assertThrows(NullPointerException.class, () -> EpConfig.builder().dispatch(null));
    rejects("ranks = 0: must be in [1, 64]", () -> EpGroup.inProcess(0));
  }

  @Test
  void bufferSizeHintGrowsWithHiddenAndRanks() {
    EpConfig c = EpConfig.builder().numSms(20).ringTokens(128).build();
    double small = c.bufferSizeHintGb(1024, DataType.BFLOAT16, 2);
    double large = c.bufferSizeHintGb(7168, DataType.BFLOAT16, 2);
    double more = c.bufferSizeHintGb(7168, DataType.BFLOAT16, 4);
    assertTrue(small > 0 && large > small && more > large, small + " " + large + " " + more);
    rejects("hidden = 7: hidden * 4 bytes", () -> c.bufferSizeHintGb(7, DataType.FLOAT, 2));
    rejects("dtype dtype = INT: must be FLOAT", () -> c.bufferSizeHintGb(64, DataType.INT, 2));
  }

  @Test
  void transferSettingsReachTheNativeConfig() {
    rejects("ceChunks = 0: must be in [1, 16]", () -> EpConfig.builder().ceChunks(0));
    rejects("ceChunks = 17: must be in [1, 16]", () -> EpConfig.builder().ceChunks(17));
    assertThrows(NullPointerException.class, () -> EpConfig.builder().cudaTransfer(null));
    EpConfig set = EpConfig.builder().cudaTransfer(EpConfig.CudaTransfer.COPY_ENGINE).ceChunks(2).cudaTrace(true)
        .cpuDirect(false).build();
    try (org.deepep4j.natives.DeepEp4jNative.Config c = set.toNative(0)) {
      assertEquals(2, c.cuda_transfer());
      assertEquals(2, c.ce_chunks());
      assertEquals(1, c.cuda_trace());
      assertEquals(0, c.cpu_direct());
    }
    EpConfig copy = set.toBuilder().build();
    assertEquals(EpConfig.CudaTransfer.COPY_ENGINE, copy.cudaTransfer());
    assertEquals(2, copy.ceChunks());
    // Unset: the engine's defaults (deepep4j_config_init), unless the environment gives others.
    if (System.getenv("DEEPEP4J_CE_CHUNKS") == null && System.getenv("DEEPEP4J_CPU_DIRECT") == null) {
      try (org.deepep4j.natives.DeepEp4jNative.Config c = EpConfig.defaults().toNative(0)) {
        assertEquals(4, c.ce_chunks());
        assertEquals(1, c.cpu_direct());
      }
    }
  }

  @Test
  void hostCopyThreadsReachTheNativeConfig() {
    rejects("hostCopyThreads = -1: must be in [0, 64]", () -> EpConfig.builder().hostCopyThreads(-1));
    rejects("hostCopyThreads = 65: must be in [0, 64]", () -> EpConfig.builder().hostCopyThreads(65));
    EpConfig c = EpConfig.builder().hostCopyThreads(6).build();
    assertEquals(6, c.toBuilder().build().hostCopyThreads());
    try (org.deepep4j.natives.DeepEp4jNative.Config n = c.toNative(0)) {
      assertEquals(6, n.host_copy_threads());
    }
    try (org.deepep4j.natives.DeepEp4jNative.Config n = EpConfig.defaults().toNative(0)) {
      assertEquals(0, n.host_copy_threads());  // automatic
    }
  }

  /** Refused where the engine refuses it (copy engines) or where it would change nothing (CPU, NCCL all-to-all). */
  @Test
  void streamOrderedIsRefusedWhereItCannotWork() {
    rejects("streamOrdered = true with device = CPU: stream-ordered steps are a CUDA feature",
        () -> EpConfig.builder().streamOrdered(true).build());
    rejects("streamOrdered = true with dispatch = ALLTOALL: stream-ordered steps need the DEEPEP dispatcher",
        () -> EpConfig.builder().device(EpDevice.CUDA).dispatch(EpDispatch.ALLTOALL).streamOrdered(true).build());
    rejects("streamOrdered = true with cudaTransfer = COPY_ENGINE: stream-ordered steps use the SM ring kernels",
        () -> EpConfig.builder().device(EpDevice.CUDA).cudaTransfer(EpConfig.CudaTransfer.COPY_ENGINE)
            .streamOrdered(true).build());
    // off is accepted everywhere; on reaches the native config for CUDA + DEEPEP
    assertEquals(Boolean.FALSE, EpConfig.builder().streamOrdered(false).build().streamOrdered());
    EpConfig on = EpConfig.builder().device(EpDevice.CUDA).cudaTransfer(EpConfig.CudaTransfer.SM).streamOrdered(true).build();
    assertEquals(Boolean.TRUE, on.toBuilder().build().streamOrdered());
    try (org.deepep4j.natives.DeepEp4jNative.Config n = on.toNative(1)) {
      assertEquals(1, n.stream_ordered());
    }
    // without a GPU the buffer itself is refused with the engine's words, on every rank
    if (org.deepep4j.natives.DeepEp4jNative.deepep4j_cuda_device_count() == 0) {
      try (EpGroup g = EpGroup.inProcess(1)) {
        IllegalStateException e = assertThrows(IllegalStateException.class, () -> g.buffer(0, on));
        assertTrue(e.getMessage().contains("CUDA"), e.getMessage());
      }
    }
  }
}

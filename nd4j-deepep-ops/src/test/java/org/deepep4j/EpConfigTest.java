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
}

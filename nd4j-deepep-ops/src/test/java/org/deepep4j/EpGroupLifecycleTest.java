package org.deepep4j;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.time.Duration;
import org.junit.jupiter.api.Test;

/** Closed means closed: after EpGroup.close() every call but close refuses, naming the call. */
class EpGroupLifecycleTest {

  @Test
  void closedGroupRefusesEveryCall() {
    EpGroup group = EpGroup.inProcess(2);
    group.close();
    assertTrue(group.isClosed());
    EpConfig cfg = EpConfig.builder().bufferSizeGb(0.01).build();
    IllegalStateException e = assertThrows(IllegalStateException.class, () -> group.buffer(0, cfg));
    assertEquals("buffer: this EpGroup of 2 ranks is closed; make a new group", e.getMessage());
    e = assertThrows(IllegalStateException.class, () -> group.runOnAllRanks(r -> r, Duration.ofSeconds(5)));
    assertTrue(e.getMessage().startsWith("runOnAllRanks: this EpGroup of 2 ranks is closed"), e.getMessage());
    e = assertThrows(IllegalStateException.class, () -> group.allGather(0, new byte[1]));
    assertTrue(e.getMessage().startsWith("allGather: this EpGroup of 2 ranks is closed"), e.getMessage());
    group.close(); // idempotent
  }
}

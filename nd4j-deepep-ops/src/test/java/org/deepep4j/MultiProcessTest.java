package org.deepep4j;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.io.IOException;
import java.net.ServerSocket;
import java.time.Duration;
import java.util.HashMap;
import java.util.Map;
import java.util.concurrent.CompletableFuture;
import java.util.concurrent.TimeUnit;
import org.junit.jupiter.api.Test;

class MultiProcessTest {
  static int freePort() throws IOException {
    try (ServerSocket s = new ServerSocket(0)) {
      return s.getLocalPort();
    }
  }

  @Test
  void rendezvousRefusesAWrongSecretAndKeepsWaitingForTheRealRank() throws Exception {
    int port = freePort();
    CompletableFuture<EpGroup> host = CompletableFuture.supplyAsync(
        () -> EpGroup.tcp(0, 2, "127.0.0.1", port, "right", Duration.ofSeconds(20)));
    IllegalStateException e = assertThrows(IllegalStateException.class,
        () -> EpGroup.tcp(1, 2, "127.0.0.1", port, "wrong", Duration.ofSeconds(20)));
    assertTrue(e.getMessage().contains("refused this rank: wrong secret"), e.getMessage());
    try (EpGroup joined = EpGroup.tcp(1, 2, "127.0.0.1", port, "right", Duration.ofSeconds(20));
         EpGroup g0 = host.get(20, TimeUnit.SECONDS)) {
      CompletableFuture<byte[][]> a = CompletableFuture.supplyAsync(() -> g0.allGather(0, new byte[] {1}));
      byte[][] b = joined.allGather(1, new byte[] {2, 3});
      assertEquals(2, b[1].length);
      assertEquals(1, a.get(10, TimeUnit.SECONDS)[0][0]);
    }
  }

  @Test
  void aRankThatNeverComesTimesOut() throws Exception {
    int port = freePort();
    EpTimeoutException e = assertThrows(EpTimeoutException.class,
        () -> EpGroup.tcp(0, 2, "127.0.0.1", port, "x", Duration.ofMillis(300)));
    assertTrue(e.getMessage().contains("1 of 2 joined"), e.getMessage());
  }

  @Test
  void environmentFollowsTorchrunConventions() {
    Map<String, String> env = new HashMap<>();
    env.put("RANK", "0");
    env.put("WORLD_SIZE", "1");
    env.put("MASTER_PORT", "0");
    IllegalArgumentException e = assertThrows(IllegalArgumentException.class, () -> EpGroup.fromEnvironment(env));
    assertTrue(e.getMessage().startsWith("MASTER_PORT = 0: must be in [1, 65535]"), e.getMessage());
    env.remove("RANK");
    e = assertThrows(IllegalArgumentException.class, () -> EpGroup.fromEnvironment(env));
    assertTrue(e.getMessage().startsWith("RANK = unset"), e.getMessage());
    env.put("RANK", "0");
    env.put("MASTER_PORT", "29500");
    e = assertThrows(IllegalArgumentException.class, () -> EpGroup.fromEnvironment(env));
    assertTrue(e.getMessage().startsWith("secret = empty"), e.getMessage());
  }
}

package org.deepep4j;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertNull;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.io.File;
import java.nio.file.Files;
import java.nio.file.Path;
import java.time.Duration;
import java.util.Map;
import java.util.concurrent.TimeUnit;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

/** Two JVMs on loopback form one EP group: this one is rank 0, a spawned `java` with the test classpath is rank 1. */
class TwoProcessTest {
  @Test
  void twoJvmsDispatchAndCombineAsOneGroup(@TempDir Path dir) throws Exception {
    int port = MultiProcessTest.freePort();
    String secret = "two-process-test-secret";
    String java = Path.of(System.getProperty("java.home"), "bin", "java").toString();
    ProcessBuilder pb = new ProcessBuilder(java, "-Xmx512m", "-cp", System.getProperty("java.class.path"),
        TwoProcessPeer.class.getName());
    Map<String, String> env = pb.environment();
    env.put("RANK", "1");
    env.put("WORLD_SIZE", "2");
    env.put("MASTER_ADDR", "127.0.0.1");
    env.put("MASTER_PORT", Integer.toString(port));
    env.put("DEEPEP4J_SECRET", secret);
    File log = dir.resolve("peer.log").toFile();
    pb.redirectErrorStream(true).redirectOutput(log);
    Process peer = pb.start();
    try {
      String bad;
      try (EpGroup group = EpGroup.tcp(0, 2, "127.0.0.1", port, secret, Duration.ofSeconds(60))) {
        bad = TwoProcessPeer.run(group, 0);
      }
      assertTrue(peer.waitFor(60, TimeUnit.SECONDS), "peer did not exit within 60 s");
      String peerLog = Files.readString(log.toPath());
      assertNull(bad);
      assertEquals(0, peer.exitValue(), peerLog);
      assertTrue(peerLog.contains("PEER OK"), peerLog);
    } finally {
      peer.destroyForcibly();
    }
  }
}

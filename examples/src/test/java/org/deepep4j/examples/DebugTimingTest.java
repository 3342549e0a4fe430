package org.deepep4j.examples;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.io.File;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.Paths;
import java.util.List;
import java.util.concurrent.TimeUnit;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

/** The README's DEEPEP4J_DEBUG_EP=1 prints per-phase times in the README's main job, and nothing without it. */
class DebugTimingTest {

  private static String runMain(Path dir, boolean debug) throws Exception {
    String java = Paths.get(System.getProperty("java.home"), "bin", "java").toString();
    ProcessBuilder pb = new ProcessBuilder(java, "-Xmx1g", "-cp", System.getProperty("java.class.path"),
        Main.class.getName(), "--epochs", "1", "--steps", "2", "--tokens", "16", "--out", dir.toString());
    pb.environment().remove("DEEPEP4J_DEBUG_EP");
    if (debug) pb.environment().put("DEEPEP4J_DEBUG_EP", "1");
    File log = dir.resolve(debug ? "debug.log" : "plain.log").toFile();
    pb.redirectErrorStream(true).redirectOutput(log);
    Process p = pb.start();
    boolean done = p.waitFor(180, TimeUnit.SECONDS);
    if (!done) p.destroyForcibly();
    String out = new String(Files.readAllBytes(log.toPath()), StandardCharsets.UTF_8);
    assertTrue(done, "main job did not finish in 180 s:\n" + out);
    assertEquals(0, p.exitValue(), out);
    return out;
  }

  @Test
  void debugEpPrintsPhaseTimesOfEveryRankInTheMainJob(@TempDir Path dir) throws Exception {
    String out = runMain(dir, true);
    for (String rank : List.of("rank 0", "rank 1")) {
      for (int it = 0; it < 2; it++) {
        String line = rank + " MoE layer 0 iteration " + it + ": routing ";
        assertTrue(out.contains(line), "no '" + line + "' in:\n" + out);
      }
    }
    assertTrue(out.contains("dispatch") && out.contains("expert compute") && out.contains("combine"), out);
    String plain = runMain(dir, false);
    assertFalse(plain.contains("MoE layer 0 iteration"), plain);
  }
}

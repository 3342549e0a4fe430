package org.deepep4j.samediff;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.io.File;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.time.Duration;
import java.util.Collections;
import java.util.Map;
import java.util.concurrent.TimeUnit;
import org.deepep4j.EpBuffer;
import org.deepep4j.EpGroup;
import org.junit.jupiter.api.BeforeAll;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;
import org.nd4j.autodiff.samediff.SDVariable;
import org.nd4j.autodiff.samediff.SameDiff;
import org.nd4j.linalg.api.buffer.DataType;
import org.nd4j.linalg.api.ndarray.INDArray;
import org.nd4j.linalg.factory.Nd4j;

/** SameDiff graphs with the deepep4j ops survive {@code save} / {@code load} and run again once bound to a buffer. */
class SaveLoadTest {
  @BeforeAll
  static void install() {
    DeepEp.install();
  }

  /** out = weighted combine of 3 * dispatch(x); loss = sum(out * c); data fixed by the rank. */
  static SameDiff graph(EpBuffer buf, int rank, int ranks) {
    int n = 7, h = 8, k = 3, experts = 2 * ranks;
    Nd4j.getRandom().setSeed(5 + rank);
    SameDiff sd = SameDiff.create();
    SDVariable x = sd.var("x", Nd4j.rand(DataType.FLOAT, n, h).subi(0.5));
    SDVariable w = sd.var("w", Nd4j.rand(DataType.FLOAT, n, k));
    SDVariable idx = sd.constant("idx", Nd4j.create(SameDiffOpsTest.topk(n, k, experts, 11 + rank), new long[] {n, k}, DataType.LONG));
    EpDispatchVars d = DeepEp.of(sd).dispatch(buf, x, idx, w, experts);
    SDVariable out = DeepEp.of(sd).combine(d, d.recvX().mul(3.0), d.recvTopkWeights()).rename("out");
    out.mul(sd.constant("c", Nd4j.rand(DataType.FLOAT, n, h))).sum().rename("loss");
    sd.setLossVariables("loss");
    return sd;
  }

  @Test
  void savedGraphsRunAgainOnNewBuffersOnceBound(@TempDir Path dir) {
    int ranks = 2;
    INDArray[][] before = new INDArray[ranks][];
    try (EpGroup group = EpGroup.inProcess(ranks)) {
      group.runOnAllRanks(rank -> {
        try (EpBuffer buf = group.buffer(rank, SameDiffOpsTest.SMALL)) {
          SameDiff sd = graph(buf, rank, ranks);
          INDArray out = sd.output(Collections.emptyMap(), "out").get("out");
          Map<String, INDArray> g = sd.calculateGradients(Collections.emptyMap(), "x", "w");
          before[rank] = new INDArray[] {out, g.get("x"), g.get("w")};
          sd.save(dir.resolve("rank" + rank + ".fb").toFile(), true);
        }
        return null;
      }, Duration.ofSeconds(60));
    }
    try (EpGroup group = EpGroup.inProcess(ranks)) {
      group.runOnAllRanks(rank -> {
        try (EpBuffer buf = group.buffer(rank, SameDiffOpsTest.SMALL)) {
          SameDiff sd = SameDiff.load(dir.resolve("rank" + rank + ".fb").toFile(), true);
          // the saved graph names the closed buffer of the first group: refused, naming the op and the remedy
          IllegalStateException e = assertThrows(IllegalStateException.class, () -> sd.output(Collections.emptyMap(), "out"));
          assertTrue(e.getMessage().contains("deepep4j_dispatch") && e.getMessage().contains("DeepEp.bind"), e.getMessage());
          assertEquals(2, DeepEp.bind(sd, buf), "dispatch and combine bound");
          INDArray out = sd.output(Collections.emptyMap(), "out").get("out");
          Map<String, INDArray> g = sd.calculateGradients(Collections.emptyMap(), "x", "w");
          assertEquals(before[rank][0], out, "rank " + rank + " out");
          assertEquals(before[rank][1], g.get("x"), "rank " + rank + " dx");
          assertEquals(before[rank][2], g.get("w"), "rank " + rank + " dw");
        }
        return null;
      }, Duration.ofSeconds(60));
    }
  }

  /** A file from another process names that process's buffer id, which may be open here for something else. */
  @Test
  void graphSavedByAnotherProcessIsRefusedUntilBound(@TempDir Path dir) throws Exception {
    String java = Path.of(System.getProperty("java.home"), "bin", "java").toString();
    Process p = new ProcessBuilder(java, "-Xmx1g", "-Dopexec=" + DeepEpExecutioner.class.getName(), "-cp",
        System.getProperty("java.class.path"), SaveLoadPeer.class.getName(), dir.toString()).redirectErrorStream(true).start();
    String log = new String(p.getInputStream().readAllBytes(), StandardCharsets.UTF_8);
    assertTrue(p.waitFor(120, TimeUnit.SECONDS), "the saving JVM did not exit");
    assertTrue(log.contains("SAVED"), log);
    INDArray expected = Nd4j.readBinary(dir.resolve("out.bin").toFile());
    try (EpGroup group = EpGroup.inProcess(1)) {
      group.runOnAllRanks(rank -> {
        try (EpBuffer buf = group.buffer(rank, SameDiffOpsTest.SMALL)) {
          SameDiff sd = SameDiff.load(dir.resolve("graph.fb").toFile(), true);
          IllegalStateException e = assertThrows(IllegalStateException.class, () -> sd.output(Collections.emptyMap(), "out"));
          assertTrue(e.getMessage().contains("another process") && e.getMessage().contains("DeepEp.bind"), e.getMessage());
          DeepEp.bind(sd, buf);
          assertEquals(expected, sd.output(Collections.emptyMap(), "out").get("out"));
        }
        return null;
      }, Duration.ofSeconds(60));
    }
    assertTrue(Files.exists(dir.resolve("graph.fb")));
  }
}

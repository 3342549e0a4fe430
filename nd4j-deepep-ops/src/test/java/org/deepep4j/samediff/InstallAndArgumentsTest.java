package org.deepep4j.samediff;

import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.nio.charset.StandardCharsets;
import java.nio.file.Path;
import java.time.Duration;
import java.util.concurrent.TimeUnit;
import org.deepep4j.EpBuffer;
import org.deepep4j.EpConfig;
import org.deepep4j.EpGroup;
import org.junit.jupiter.api.Test;
import org.nd4j.autodiff.samediff.SDVariable;
import org.nd4j.autodiff.samediff.SameDiff;
import org.nd4j.linalg.api.buffer.DataType;
import org.nd4j.linalg.factory.Nd4j;

class InstallAndArgumentsTest {
  @Test
  void installAfterNd4jStartedNamesTheRunningExecutioner() throws Exception {
    String java = Path.of(System.getProperty("java.home"), "bin", "java").toString();
    Process p = new ProcessBuilder(java, "-Xmx512m", "-cp", System.getProperty("java.class.path"), InstallPeer.class.getName())
        .redirectErrorStream(true).start();
    byte[] out = p.getInputStream().readAllBytes();
    assertTrue(p.waitFor(60, TimeUnit.SECONDS), "the JVM did not exit");
    String text = new String(out, StandardCharsets.UTF_8);
    assertTrue(text.contains("REFUSED: ND4J already runs with executioner org.nd4j.linalg.cpu.nativecpu.ops.NativeOpExecutioner")
        && text.contains("-Dopexec=org.deepep4j.samediff.DeepEpExecutioner"), text);
  }

  @Test
  void installRefusesAnotherOpexecSetting() {
    String before = System.getProperty("opexec");
    System.setProperty("opexec", "com.example.OtherExecutioner");
    try {
      IllegalStateException e = assertThrows(IllegalStateException.class, DeepEp::install);
      assertTrue(e.getMessage().startsWith("opexec = com.example.OtherExecutioner: the deepep4j ops need opexec = "
          + DeepEpExecutioner.class.getName()), e.getMessage());
    } finally {
      if (before == null) System.clearProperty("opexec");
      else System.setProperty("opexec", before);
    }
  }

  @Test
  void badArgumentsNameArgumentValueAndRule() {
    DeepEp.install();
    IllegalArgumentException e = assertThrows(IllegalArgumentException.class, () -> EpBuffer.byId(-5));
    assertTrue(e.getMessage().startsWith("bufferId = -5: no open EpBuffer"), e.getMessage());
    e = assertThrows(IllegalArgumentException.class, () -> DeepEp.of(null));
    assertTrue(e.getMessage().startsWith("sd = null"), e.getMessage());
    SameDiff sd = SameDiff.create();
    SDVariable x = sd.var("x", Nd4j.rand(DataType.FLOAT, 2, 4));
    SDVariable idx = sd.constant(Nd4j.zeros(DataType.LONG, 2, 1));
    e = assertThrows(IllegalArgumentException.class, () -> DeepEp.of(sd).dispatch(null, x, idx, null, 2));
    assertTrue(e.getMessage().startsWith("buf = null"), e.getMessage());
    e = assertThrows(IllegalArgumentException.class, () -> DeepEp.of(sd).combine(null, x));
    assertTrue(e.getMessage().startsWith("d = null"), e.getMessage());
    // a closed buffer's graph fails naming the buffer id
    EpConfig cfg = EpConfig.builder().bufferSizeGb(1.0 / 64).numSms(2).timeout(Duration.ofSeconds(10)).build();
    EpDispatchVars d;
    int id;
    try (EpGroup group = EpGroup.inProcess(1); EpBuffer buf = group.buffer(0, cfg)) {
      d = DeepEp.of(sd).dispatch(buf, x, idx, null, 2);
      id = buf.id();
    }
    String out = d.recvX().name();
    RuntimeException r = assertThrows(RuntimeException.class, () -> sd.output(java.util.Collections.emptyMap(), out));
    Throwable c = r;
    while (c.getCause() != null && !(c instanceof IllegalArgumentException)) c = c.getCause();
    assertTrue(String.valueOf(c.getMessage()).contains("bufferId = " + id + ": no open EpBuffer"), String.valueOf(c));
  }
}

package org.deepep4j;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.nio.file.Files;
import java.nio.file.Path;
import org.deepep4j.natives.DeepEp4jNative;
import org.deepep4j.natives.NativeLoader;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

class NativeLoaderTest {
  @Test
  void loadsFromTheJarAndReportsItsVersion() {
    assertEquals("0.1.0", DeepEp4jNative.deepep4j_version().getString());
  }

  @Test
  void aMissingLibrarySaysPlatformPathAndWhy(@TempDir Path dir) {
    UnsatisfiedLinkError e = assertThrows(UnsatisfiedLinkError.class, () -> NativeLoader.loadFromDirectory(dir));
    String m = e.getMessage();
    assertTrue(m.contains("platform linux-x86_64"), m);
    assertTrue(m.contains(dir.resolve("libjniDeepEp4jNative.so").toString()), m);
    assertTrue(m.contains("no such file"), m);
  }

  @Test
  void aBrokenLibrarySaysWhyTheLinkerRefusedIt(@TempDir Path dir) throws Exception {
    Files.write(dir.resolve("libjniDeepEp4jNative.so"), new byte[] {1, 2, 3});
    UnsatisfiedLinkError e = assertThrows(UnsatisfiedLinkError.class, () -> NativeLoader.loadFromDirectory(dir));
    assertTrue(e.getMessage().contains("tried " + dir.resolve("libjniDeepEp4jNative.so")), e.getMessage());
    assertTrue(e.getMessage().toLowerCase().contains("elf") || e.getMessage().contains("too short"), e.getMessage());
  }
}

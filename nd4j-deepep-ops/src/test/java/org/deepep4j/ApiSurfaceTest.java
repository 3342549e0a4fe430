package org.deepep4j;

import static org.junit.jupiter.api.Assertions.assertTrue;

import java.lang.reflect.Method;
import java.util.Arrays;
import org.junit.jupiter.api.Test;

/**
 * No surface that does nothing: EpConfig has no asyncCombine (nothing read it; the MoE layer's own asyncCombine is
 * the real one) and EpBuffer no combineAsync (nothing called it).
 */
class ApiSurfaceTest {

  private static boolean has(Class<?> c, String name) {
    return Arrays.stream(c.getMethods()).map(Method::getName).anyMatch(name::equals);
  }

  @Test
  void noSettingOrCallThatDoesNothing() {
    assertTrue(!has(EpConfig.class, "asyncCombine"), "EpConfig.asyncCombine");
    assertTrue(!has(EpConfig.Builder.class, "asyncCombine"), "EpConfig.Builder.asyncCombine");
    assertTrue(!has(EpBuffer.class, "combineAsync"), "EpBuffer.combineAsync");
    assertTrue(!EpConfig.defaults().toString().contains("asyncCombine"), EpConfig.defaults().toString());
  }
}

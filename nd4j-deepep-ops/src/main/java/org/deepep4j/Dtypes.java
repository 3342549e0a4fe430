package org.deepep4j;

import org.deepep4j.natives.DeepEp4jNative;
import org.nd4j.linalg.api.buffer.DataType;

/** The payload types the engine moves: fp32, bf16 and fp16 (outputs follow the input's type). */
final class Dtypes {
  private Dtypes() {}

  static int toNative(DataType t, String argument) {
    switch (t) {
      case FLOAT: return DeepEp4jNative.DEEPEP4J_FLOAT32;
      case BFLOAT16: return DeepEp4jNative.DEEPEP4J_BFLOAT16;
      case HALF: return DeepEp4jNative.DEEPEP4J_FLOAT16;
      default:
        throw new IllegalArgumentException(argument + " dtype = " + t + ": must be FLOAT, BFLOAT16 or HALF");
    }
  }
}

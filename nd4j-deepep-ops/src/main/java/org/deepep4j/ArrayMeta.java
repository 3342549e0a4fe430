package org.deepep4j;

import java.util.Arrays;
import org.nd4j.linalg.api.buffer.DataType;
import org.nd4j.linalg.api.ndarray.INDArray;

/** Shape and type of an argument, whether an ND4J array or an {@link EpDeviceArray}: what the argument checks read. */
record ArrayMeta(long[] shape, DataType type) {
  static ArrayMeta of(INDArray a) { return a == null ? null : new ArrayMeta(a.shape(), a.dataType()); }

  static ArrayMeta of(EpDeviceArray a) { return a == null ? null : new ArrayMeta(a.shape(), a.dataType()); }

  int rank() { return shape.length; }

  long size(int d) { return shape[d]; }

  static String shapeOf(ArrayMeta a) { return a == null ? "null" : Arrays.toString(a.shape); }
}

package org.deepep4j;

import org.nd4j.linalg.api.buffer.DataType;
import org.nd4j.linalg.api.ndarray.INDArray;
import org.nd4j.linalg.api.shape.Shape;
import org.nd4j.linalg.factory.Nd4j;

/** INDArrays as native addresses: contiguous C-order arrays go as they are, others are copied once. */
final class NativeArrays {
  private NativeArrays() {}

  /** The array itself when it is dense C-order of {@code type}, else a dense copy (cast when the type differs). */
  static INDArray dense(INDArray a, DataType type) {
    if (a == null) return null;
    if (a.dataType() != type) a = a.castTo(type);
    if (a.isEmpty()) return a;
    if (a.ordering() == 'c' && Shape.hasDefaultStridesForShape(a)) return a;  // zero-copy: views with an offset too
    return a.dup('c');
  }

  /** Address of the first element, or 0 for null / empty. */
  static long address(INDArray a) {
    if (a == null || a.isEmpty() || a.length() == 0) return 0L;
    return a.data().address() + a.offset() * a.data().getElementSize();
  }

  /** A new array outside any workspace, so results outlive the caller's workspace scope. */
  static INDArray create(DataType type, long... shape) {
    try (org.nd4j.linalg.api.memory.MemoryWorkspace ws = Nd4j.getWorkspaceManager().scopeOutOfWorkspaces()) {
      for (long s : shape) {
        if (s == 0) return Nd4j.create(type, shape);
      }
      return Nd4j.createUninitialized(type, shape);
    }
  }

  /** {@code out} when it is dense C-order of this type and shape (written in place), else a new array. */
  static INDArray outputOrNew(INDArray out, DataType type, long... shape) {
    if (out != null && out.dataType() == type && java.util.Arrays.equals(out.shape(), shape)
        && (out.isEmpty() || (out.ordering() == 'c' && Shape.hasDefaultStridesForShape(out)))) return out;
    return create(type, shape);
  }
}

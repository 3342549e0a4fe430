package org.deepep4j;

import java.util.Arrays;
import org.bytedeco.javacpp.LongPointer;
import org.deepep4j.natives.DeepEp4jNative;
import org.nd4j.linalg.api.buffer.DataType;
import org.nd4j.linalg.api.ndarray.INDArray;

/**
 * A dense C-order array in the memory of an {@link EpBuffer}'s device: GPU memory on a CUDA buffer, host memory on
 * the CPU device. For callers who chain engine calls (dispatch, the experts' work, combine) without leaving the GPU:
 * {@link EpBuffer}'s overloads taking device arrays queue their work on the rank's stream and copy nothing to the host.
 * Made by {@link EpBuffer#allocate} or {@link EpBuffer#toDevice}; {@link #copyFrom} and {@link #toHost} move ND4J
 * arrays in and out (through pinned staging on a GPU) and return with the copy complete. Close it (or its buffer) to
 * free the memory; a closed array is refused by name.
 */
public final class EpDeviceArray implements AutoCloseable {
  private final EpBuffer buffer;
  private final DataType dataType;
  private final long[] shape;
  private final long length;
  private final long address;
  private boolean closed;

  private EpDeviceArray(EpBuffer buffer, DataType dataType, long[] shape, long address) {
    this.buffer = buffer;
    this.dataType = dataType;
    this.shape = shape;
    this.length = lengthOf(shape);
    this.address = address;
  }

  /** Uninitialised memory of this type and shape on the buffer's device. */
  static EpDeviceArray allocate(EpBuffer buffer, DataType type, long... shape) {
    if (type == null) throw new IllegalArgumentException("dataType = null: a device array needs an ND4J DataType");
    if (shape == null) throw new IllegalArgumentException("shape = null: a device array needs a shape");
    for (long s : shape)
      if (s < 0) throw new IllegalArgumentException("shape = " + Arrays.toString(shape) + ": sizes must be >= 0");
    long bytes = lengthOf(shape) * type.width();
    try (LongPointer out = new LongPointer(1)) {
      Status.check(DeepEp4jNative.deepep4j_device_alloc(buffer.queue(), bytes, out), buffer.describe());
      EpDeviceArray a = new EpDeviceArray(buffer, type, shape.clone(), out.get());
      buffer.track(a);
      return a;
    }
  }

  private static long lengthOf(long[] shape) {
    long n = 1;
    for (long s : shape) n = Math.multiplyExact(n, s);
    return n;
  }

  public DataType dataType() { return dataType; }
  public long[] shape() { return shape.clone(); }
  public long size(int dimension) { return shape[dimension]; }
  public int rank() { return shape.length; }
  public long length() { return length; }
  /** Bytes of memory the array holds. */
  public long bytes() { return length * dataType.width(); }
  public EpBuffer buffer() { return buffer; }
  public boolean isClosed() { return closed; }

  /** The device address (0 for an empty array); fails naming the array when it was closed. */
  long address() {
    if (isClosed()) throw new IllegalStateException("EpDeviceArray " + this + ": already closed");
    return address;
  }

  /** Copies {@code host} (same shape; cast to this type when it differs) into this array; done on return. */
  public void copyFrom(INDArray host) {
    if (host == null || !Arrays.equals(host.shape(), shape))
      throw new IllegalArgumentException("host shape = " + (host == null ? "null" : Arrays.toString(host.shape()))
          + ": must equal the device array's shape " + Arrays.toString(shape));
    INDArray dense = NativeArrays.dense(host, dataType);
    synchronized (buffer) {
      Status.check(DeepEp4jNative.deepep4j_copy_to_device(buffer.queue(), address(), NativeArrays.address(dense), bytes()),
          buffer.describe());
      Status.check(DeepEp4jNative.deepep4j_queue_synchronize(buffer.queue()), buffer.describe());
    }
  }

  /** A new ND4J array with this array's contents, after the rank's queued work (dispatch, combine) is complete. */
  public INDArray toHost() {
    return copyTo(NativeArrays.create(dataType, shape));
  }

  /**
   * Copies this array into {@code host} (same type and shape, dense C-order; overwritten) after the rank's queued work
   * is complete, and returns it: reusing one host array spares the first touch of fresh pages each time. On a
   * stream-ordered buffer a queued step's failure is thrown first and {@code host} stays untouched.
   */
  public INDArray copyTo(INDArray host) {
    String bad = host == null ? "host = null: copyTo needs an array of " + dataType + Arrays.toString(shape)
        : EpBuffer.checkOutput("host", host, dataType, shape);
    if (bad != null) throw new IllegalArgumentException(bad);
    synchronized (buffer) {
      buffer.awaitQueuedSteps();
      Status.check(DeepEp4jNative.deepep4j_copy_to_host(buffer.queue(), NativeArrays.address(host), address(), bytes()),
          buffer.describe());
      Status.check(DeepEp4jNative.deepep4j_queue_synchronize(buffer.queue()), buffer.describe());
    }
    return host;
  }

  /** Frees the memory (in the rank's stream order: after the work queued before). Safe to call twice. */
  @Override
  public void close() {
    synchronized (buffer) {
      if (closed) return;
      closed = true;
      buffer.untrack(this);
      if (address != 0) Status.check(DeepEp4jNative.deepep4j_device_free(buffer.queue(), address), buffer.describe());
    }
  }

  @Override
  public String toString() {
    return dataType + Arrays.toString(shape) + " on rank " + buffer.rank() + "'s " + buffer.device();
  }
}

package org.deepep4j;

import java.util.ArrayList;
import java.util.List;
import org.deepep4j.natives.DeepEp4jNative;
import org.nd4j.linalg.api.ndarray.INDArray;

/**
 * One call's host arrays at the engine edge. On a CUDA buffer inputs are copied into device arrays and outputs are
 * computed in device arrays and copied back by {@link #finish()} (pinned staging, async copies on the rank's stream);
 * a call that fails never reaches finish, so its outputs stay untouched. The engine copies between the host arrays and
 * pinned memory with the buffer's {@code hostCopyThreads}, chunk by chunk beside the transfers. On the CPU device the
 * host arrays are used in place. Close frees the device arrays.
 */
final class HostStaging implements AutoCloseable {
  private final EpBuffer buffer;
  private final boolean staged;
  private final List<Long> temporaries = new ArrayList<>();
  private final List<long[]> outputs = new ArrayList<>();  // {host address, device address, bytes}

  HostStaging(EpBuffer buffer) {
    this.buffer = buffer;
    this.staged = buffer.device() == EpDevice.CUDA;
  }

  /** The engine's address of a dense input: itself on the CPU, a device copy on a GPU (0 for null / empty). */
  long in(INDArray dense) {
    return in(NativeArrays.address(dense), dense == null ? 0 : dense.length() * dense.data().getElementSize());
  }

  long in(long host, long bytes) {
    if (!staged || host == 0) return host;
    long device = temporary(bytes);
    Status.check(DeepEp4jNative.deepep4j_copy_to_device(buffer.queue(), device, host, bytes), buffer.describe());
    return device;
  }

  /** The engine's address of a dense output, whose host array {@link #finish()} fills on a GPU. */
  long out(INDArray dense) {
    return out(NativeArrays.address(dense), dense == null ? 0 : dense.length() * dense.data().getElementSize());
  }

  long out(long host, long bytes) {
    if (!staged || host == 0) return host;
    long device = temporary(bytes);
    outputs.add(new long[] {host, device, bytes});
    return device;
  }

  private long temporary(long bytes) {
    try (org.bytedeco.javacpp.LongPointer p = new org.bytedeco.javacpp.LongPointer(1)) {
      Status.check(DeepEp4jNative.deepep4j_device_alloc(buffer.queue(), bytes, p), buffer.describe());
      temporaries.add(p.get());
      return p.get();
    }
  }

  /** After the engine call succeeded: copies the outputs back and waits for them. */
  void finish() {
    if (!staged) return;
    buffer.awaitQueuedSteps();  // a stream-ordered step that failed on the GPU is thrown before any output is written
    for (long[] o : outputs)
      Status.check(DeepEp4jNative.deepep4j_copy_to_host(buffer.queue(), o[0], o[1], o[2]), buffer.describe());
    Status.check(DeepEp4jNative.deepep4j_queue_synchronize(buffer.queue()), buffer.describe());
  }

  @Override
  public void close() {
    for (long d : temporaries) DeepEp4jNative.deepep4j_device_free(buffer.queue(), d);
    temporaries.clear();
  }
}

package org.deepep4j;

import java.time.Duration;
import java.util.concurrent.BrokenBarrierException;
import java.util.concurrent.CyclicBarrier;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.TimeoutException;

/** Ranks are threads of this JVM: blobs meet in an array between two barriers. */
final class InProcessExchange implements BlobExchange {
  private final int size;
  private final byte[][] slots;
  private final CyclicBarrier barrier;

  InProcessExchange(int size) {
    this.size = size;
    this.slots = new byte[size][];
    this.barrier = new CyclicBarrier(size);
  }

  @Override
  public byte[][] allGather(int rank, byte[] mine, Duration timeout) {
    slots[rank] = mine;
    await(rank, timeout);
    byte[][] all = slots.clone();
    await(rank, timeout);  // nobody overwrites a slot before every rank has read them all
    return all;
  }

  private void await(int rank, Duration timeout) {
    try {
      barrier.await(timeout.toMillis(), TimeUnit.MILLISECONDS);
    } catch (TimeoutException e) {
      barrier.reset();
      throw new EpTimeoutException("rank " + rank + ": timed out after " + timeout.toMillis()
          + " ms waiting for the other ranks of the in-process group of " + size + " (each rank's thread must make the same call)");
    } catch (BrokenBarrierException e) {
      throw new EpTimeoutException("rank " + rank + ": another rank of the in-process group of " + size
          + " timed out or was interrupted");
    } catch (InterruptedException e) {
      Thread.currentThread().interrupt();
      throw new IllegalStateException("rank " + rank + ": interrupted while waiting for the in-process group", e);
    }
  }

  @Override
  public void close() {
    barrier.reset();
  }
}

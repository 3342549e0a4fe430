package org.deepep4j.examples;

import java.time.Duration;
import java.util.concurrent.BrokenBarrierException;
import java.util.concurrent.CyclicBarrier;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.TimeoutException;
import org.nd4j.linalg.api.ndarray.INDArray;

/**
 * Mean of one array over the in-process ranks, for the replicated router's gradient and the loss. Each rank's thread
 * calls {@link #mean}; every wait is bounded by the timeout.
 */
public final class ReplicaReduce {
    private final INDArray[] slots;
    private final CyclicBarrier barrier;
    private final Duration timeout;

    public ReplicaReduce(int ranks, Duration timeout) {
        this.slots = new INDArray[ranks];
        this.barrier = new CyclicBarrier(ranks);
        this.timeout = timeout;
    }

    public INDArray mean(int rank, INDArray value) {
        slots[rank] = value;
        await();
        INDArray sum = slots[0].dup();
        for (int r = 1; r < slots.length; r++) sum.addi(slots[r]);
        // Second barrier: no rank may overwrite its slot for the next reduction before all have read this one.
        await();
        return sum.divi(slots.length);
    }

    private void await() {
        try {
            barrier.await(timeout.toMillis(), TimeUnit.MILLISECONDS);
        } catch (TimeoutException | BrokenBarrierException e) {
            throw new IllegalStateException("ranks did not meet within the timeout of " + timeout.toSeconds()
                    + " s (another rank failed or is stuck)", e);
        } catch (InterruptedException e) {
            Thread.currentThread().interrupt();
            throw new IllegalStateException("interrupted while waiting for the other ranks", e);
        }
    }
}

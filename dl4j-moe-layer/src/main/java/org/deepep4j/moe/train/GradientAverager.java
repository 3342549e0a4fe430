package org.deepep4j.moe.train;

import org.deepep4j.moe.layers.MoELayerImpl;
import org.deepep4j.moe.params.MoEParamInitializer;
import org.deeplearning4j.nn.api.Layer;
import org.deeplearning4j.nn.api.Model;
import org.deeplearning4j.nn.multilayer.MultiLayerNetwork;
import org.deeplearning4j.optimize.api.BaseTrainingListener;
import org.nd4j.linalg.api.ndarray.INDArray;
import org.nd4j.linalg.factory.Nd4j;

import java.time.Duration;
import java.util.Map;
import java.util.concurrent.BrokenBarrierException;
import java.util.concurrent.CyclicBarrier;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.TimeoutException;

/**
 * In-process all-reduce of the gradients of R replicas, run between backprop and the updater (DL4J calls
 * {@code onGradientCalculation} there). Replicated parameters get the mean over ranks; routed-expert parameters stay
 * local but are divided by R, because their gradient already sums the contributions of every rank's tokens while each
 * rank's loss is a mean over its own minibatch.
 */
final class GradientAverager {

    private final int size;
    private final Duration timeout;
    private final CyclicBarrier barrier;
    private final INDArray[] published;

    GradientAverager(int size, Duration timeout) {
        this.size = size;
        this.timeout = timeout;
        this.barrier = new CyclicBarrier(size);
        this.published = new INDArray[size];
    }

    /** The listener for rank {@code rank}'s replica. */
    BaseTrainingListener listener(int rank, MultiLayerNetwork net) {
        INDArray replicated = replicatedMask(net);
        return new BaseTrainingListener() {
            @Override
            public void onGradientCalculation(Model model) {
                INDArray g = net.getFlattenedGradients();
                published[rank] = g;
                sync(rank);
                INDArray sum = published[0].dup();
                for (int r = 1; r < size; r++) {
                    sum.addi(published[r]);
                }
                sync(rank);
                // replicated: sum / R; expert: own / R
                INDArray local = g.mul(replicated.rsub(1.0));
                g.assign(sum.muli(replicated).addi(local).divi(size));
            }
        };
    }

    /** 1 where the flattened parameter is replicated on every rank, 0 for routed-expert parameters. */
    static INDArray replicatedMask(MultiLayerNetwork net) {
        INDArray mask = Nd4j.ones(net.params().dataType(), net.params().shape());
        INDArray flat = mask.reshape(mask.length());
        long offset = 0;
        for (Layer layer : net.getLayers()) {
            for (Map.Entry<String, INDArray> p : layer.paramTable().entrySet()) {
                long n = p.getValue().length();
                if (layer instanceof MoELayerImpl && MoEParamInitializer.isExpertParam(p.getKey())) {
                    flat.get(org.nd4j.linalg.indexing.NDArrayIndex.interval(offset, offset + n)).assign(0.0);
                }
                offset += n;
            }
        }
        if (offset != flat.length()) {
            throw new IllegalStateException("parameter table covers " + offset + " of " + flat.length() + " parameters");
        }
        return mask;
    }

    private void sync(int rank) {
        try {
            barrier.await(timeout.toMillis(), TimeUnit.MILLISECONDS);
        } catch (TimeoutException e) {
            throw new IllegalStateException("gradient all-reduce rank " + rank + ": waited more than " + timeout
                    + " for the other ranks", e);
        } catch (BrokenBarrierException e) {
            throw new IllegalStateException("gradient all-reduce rank " + rank
                    + ": aborted because another rank failed or timed out", e);
        } catch (InterruptedException e) {
            Thread.currentThread().interrupt();
            throw new IllegalStateException("gradient all-reduce rank " + rank + ": interrupted", e);
        }
    }

    void abort() {
        barrier.reset();
    }
}

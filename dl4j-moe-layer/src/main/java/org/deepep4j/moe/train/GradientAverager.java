package org.deepep4j.moe.train;

import org.deepep4j.moe.layers.MoELayerImpl;
import org.deepep4j.moe.params.MoEParamInitializer;
import org.deeplearning4j.nn.api.Layer;
import org.deeplearning4j.nn.api.Model;
import org.deeplearning4j.optimize.api.BaseTrainingListener;
import org.nd4j.linalg.api.ndarray.INDArray;
import org.nd4j.linalg.factory.Nd4j;
import org.nd4j.linalg.indexing.NDArrayIndex;

import java.time.Duration;
import java.util.Map;
import java.util.concurrent.Phaser;
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
    /** Meeting point of in-process ranks; terminated for good when a rank fails, so no rank waits for it again. */
    private final Phaser barrier;
    private volatile String abortReason;
    private final INDArray[] published;
    private final org.deepep4j.EpGroup processGroup;

    /** Ranks are threads of this JVM. */
    GradientAverager(int size, Duration timeout) {
        this.size = size;
        this.timeout = timeout;
        this.barrier = new Phaser(size);
        this.published = new INDArray[size];
        this.processGroup = null;
    }

    /** Ranks are processes of {@code group}: gradients travel through its all-gather. */
    GradientAverager(org.deepep4j.EpGroup group, Duration timeout) {
        this.size = group.size();
        this.timeout = timeout;
        this.barrier = null;
        this.published = null;
        this.processGroup = group;
    }

    /** Sum over ranks of every rank's {@code g}. */
    private INDArray sumOverRanks(int rank, INDArray g) {
        if (processGroup != null) {
            double[] mine = g.castTo(org.nd4j.linalg.api.buffer.DataType.DOUBLE).dup('c').data().asDouble();
            java.nio.ByteBuffer bytes = java.nio.ByteBuffer.allocate(mine.length * 8);
            bytes.asDoubleBuffer().put(mine);
            double[] sum = new double[mine.length];
            for (byte[] other : processGroup.allGather(rank, bytes.array())) {
                if (other.length != bytes.capacity()) {
                    throw new IllegalStateException("gradient all-reduce rank " + rank + ": a peer sent " + other.length
                            + " bytes, expected " + bytes.capacity() + " (the ranks' models differ)");
                }
                java.nio.DoubleBuffer d = java.nio.ByteBuffer.wrap(other).asDoubleBuffer();
                for (int i = 0; i < sum.length; i++) {
                    sum[i] += d.get(i);
                }
            }
            return Nd4j.createFromArray(sum).reshape(g.shape()).castTo(g.dataType());
        }
        published[rank] = g;
        sync(rank);
        INDArray sum = published[0].dup();
        for (int r = 1; r < size; r++) {
            sum.addi(published[r]);
        }
        sync(rank);
        return sum;
    }

    /**
     * The listener for rank {@code rank}'s replica. Only the replicated parameters cross ranks (gathered into one
     * vector, summed, written back as sum / R); the routed experts, usually most of the parameters, are divided by R in
     * place: no pass or allocation of the whole gradient per step.
     */
    BaseTrainingListener listener(int rank, NetworkAdapter net) {
        java.util.List<long[]> replicated = new java.util.ArrayList<>();
        java.util.List<long[]> experts = new java.util.ArrayList<>();
        java.util.List<MoELayerImpl> owners = new java.util.ArrayList<>();
        paramRanges(net, replicated, experts, owners);
        return new BaseTrainingListener() {
            @Override
            public void onGradientCalculation(Model model) {
                INDArray g = net.gradients();
                INDArray flat = g.reshape(g.length());
                if (flat.data().address() + flat.offset() * flat.data().getElementSize()
                        != g.data().address() + g.offset() * g.data().getElementSize()) {  // a copy, not a view
                    throw new IllegalStateException("the flattened gradient is not one contiguous array");
                }
                for (int i = 0; i < experts.size(); i++) {  // own / R; engine-held experts scale their own (gradScale)
                    long[] r = experts.get(i);
                    if (owners.get(i).expertGradientsInViews()) {
                        flat.get(NDArrayIndex.interval(r[0], r[0] + r[1])).divi(size);
                    }
                }
                if (replicated.isEmpty()) {
                    return;
                }
                INDArray[] parts = new INDArray[replicated.size()];
                for (int i = 0; i < parts.length; i++) {
                    long[] r = replicated.get(i);
                    parts[i] = flat.get(NDArrayIndex.interval(r[0], r[0] + r[1]));
                }
                INDArray sum = sumOverRanks(rank, parts.length == 1 ? parts[0].dup() : Nd4j.concat(0, parts)).divi(size);
                long at = 0;
                for (INDArray part : parts) {  // sum / R
                    part.assign(sum.get(NDArrayIndex.interval(at, at + part.length())));
                    at += part.length();
                }
            }
        };
    }

    /** [offset, length] in the flattened parameters of each replicated parameter, and of each routed-expert one. */
    static void paramRanges(NetworkAdapter net, java.util.List<long[]> replicated, java.util.List<long[]> experts) {
        paramRanges(net, replicated, experts, new java.util.ArrayList<>());
    }

    /** As above, with the MoE layer of each routed-expert range in {@code owners}. */
    static void paramRanges(NetworkAdapter net, java.util.List<long[]> replicated, java.util.List<long[]> experts,
                            java.util.List<MoELayerImpl> owners) {
        long offset = 0;
        for (Layer layer : net.layersInParamOrder()) {
            for (Map.Entry<String, INDArray> p : layer.paramTable().entrySet()) {
                long n = p.getValue().length();
                boolean expert = layer instanceof MoELayerImpl && MoEParamInitializer.isExpertParam(p.getKey());
                (expert ? experts : replicated).add(new long[]{offset, n});
                if (expert) {
                    owners.add((MoELayerImpl) layer);
                }
                offset += n;
            }
        }
        if (offset != net.params().length()) {
            throw new IllegalStateException("parameter table covers " + offset + " of " + net.params().length()
                    + " parameters");
        }
    }

    /** 1 where the flattened parameter is replicated on every rank, 0 for routed-expert parameters. */
    static INDArray replicatedMask(NetworkAdapter net) {
        INDArray mask = Nd4j.ones(net.params().dataType(), net.params().shape());
        INDArray flat = mask.reshape(mask.length());
        java.util.List<long[]> experts = new java.util.ArrayList<>();
        paramRanges(net, new java.util.ArrayList<>(), experts);
        for (long[] r : experts) {
            flat.get(NDArrayIndex.interval(r[0], r[0] + r[1])).assign(0.0);
        }
        return mask;
    }

    private void sync(int rank) {
        int phase = barrier.arrive();
        try {
            if (phase < 0 || barrier.awaitAdvanceInterruptibly(phase, timeout.toMillis(), TimeUnit.MILLISECONDS) < 0) {
                throw new RankAbortedException("gradient all-reduce rank " + rank + ": stopped because " + abortReason);
            }
        } catch (TimeoutException e) {
            throw new IllegalStateException("gradient all-reduce rank " + rank + ": waited more than " + timeout
                    + " for the other ranks", e);
        } catch (InterruptedException e) {
            Thread.currentThread().interrupt();
            throw new IllegalStateException("gradient all-reduce rank " + rank + ": interrupted", e);
        }
    }

    /** Releases every rank waiting here, now and later, with {@code reason} (which rank failed, and how). */
    void abort(String reason) {
        if (barrier != null) {
            if (abortReason == null) {
                abortReason = reason;
            }
            barrier.forceTermination();
        }
    }
}

package org.deepep4j.moe.train;

import org.nd4j.linalg.dataset.DataSet;
import org.nd4j.linalg.dataset.api.MultiDataSet;
import org.nd4j.linalg.dataset.api.iterator.DataSetIterator;
import org.nd4j.linalg.dataset.api.iterator.MultiDataSetIterator;

import java.util.ArrayList;
import java.util.HashMap;
import java.util.Iterator;
import java.util.List;
import java.util.Map;
import java.util.function.BiConsumer;
import java.util.function.BooleanSupplier;

/**
 * Deals the batches of one iterator to R ranks: round s of an epoch is the next R batches, rank r takes the r-th.
 * Ranks must step together (their MoE layers exchange tokens), so a round with fewer than R batches ends the epoch.
 * Batches are DataSets or MultiDataSets, as the iterator gives them, and each rank's network fits its own.
 */
final class RoundRobinBatches<T> {

    private final Iterator<T> it;
    /** DataSetIterator and MultiDataSetIterator both have these, but no common type that has them. */
    private final BooleanSupplier resetSupported;
    private final Runnable reset;
    private final BiConsumer<NetworkAdapter, T> fit;
    private final int ranks;
    private final Map<Long, List<T>> rounds = new HashMap<>();
    private final Map<Long, Integer> taken = new HashMap<>();
    private int epochReset = -1;
    /** A resumed run: rounds of {@code skipEpoch} done before, skipped after the reset. */
    private final int skipEpoch;
    private final int skipRounds;

    private RoundRobinBatches(Iterator<T> it, BooleanSupplier resetSupported, Runnable reset,
                              BiConsumer<NetworkAdapter, T> fit, int ranks, int skipEpoch, int skipRounds) {
        this.it = it;
        this.resetSupported = resetSupported;
        this.reset = reset;
        this.fit = fit;
        this.ranks = ranks;
        this.skipEpoch = skipEpoch;
        this.skipRounds = skipRounds;
    }

    /** The batches of {@code it}; the rounds of {@code skipEpoch} before {@code skipRounds} are skipped (a resume). */
    static RoundRobinBatches<DataSet> of(DataSetIterator it, int ranks, int skipEpoch, int skipRounds) {
        return new RoundRobinBatches<>(it, it::resetSupported, it::reset, NetworkAdapter::fit,
                ranks, skipEpoch, skipRounds);
    }

    static RoundRobinBatches<MultiDataSet> of(MultiDataSetIterator it, int ranks, int skipEpoch, int skipRounds) {
        return new RoundRobinBatches<>(it, it::resetSupported, it::reset, NetworkAdapter::fit,
                ranks, skipEpoch, skipRounds);
    }

    /** Fits {@code net} on rank {@code rank}'s batch of round {@code step} of {@code epoch}; false at epoch end. */
    boolean fitNext(NetworkAdapter net, int epoch, int step, int rank) {
        T batch = take(epoch, step, rank);
        if (batch == null) {
            return false;
        }
        fit.accept(net, batch);
        return true;
    }

    /** Rank {@code rank}'s batch of round {@code step} of {@code epoch}, or null at the end of the epoch. */
    private synchronized T take(int epoch, int step, int rank) {
        long key = ((long) epoch << 32) | step;
        List<T> round = rounds.get(key);
        if (round == null) {
            if (epochReset != epoch) {
                if (resetSupported.getAsBoolean()) {
                    reset.run();
                } else if (epoch > skipEpoch) {
                    throw new IllegalStateException("epoch " + epoch + ": the iterator does not support reset(), so it "
                            + "can feed one epoch only");
                }
                epochReset = epoch;
                if (epoch == skipEpoch) {
                    for (long i = 0; i < (long) skipRounds * ranks && it.hasNext(); i++) {
                        it.next();
                    }
                }
            }
            round = new ArrayList<>();
            while (round.size() < ranks && it.hasNext()) {
                round.add(it.next());
            }
            rounds.put(key, round);
        }
        int n = taken.merge(key, 1, Integer::sum);
        if (n == ranks) {
            rounds.remove(key);
            taken.remove(key);
        }
        return round.size() < ranks ? null : round.get(rank);
    }
}

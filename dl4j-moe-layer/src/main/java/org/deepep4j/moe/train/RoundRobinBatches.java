package org.deepep4j.moe.train;

import org.nd4j.linalg.dataset.api.DataSet;
import org.nd4j.linalg.dataset.api.iterator.DataSetIterator;

import java.util.ArrayList;
import java.util.HashMap;
import java.util.List;
import java.util.Map;

/**
 * Deals the batches of one iterator to R ranks: round s of an epoch is the next R batches, rank r takes the r-th.
 * Ranks must step together (their MoE layers exchange tokens), so a round with fewer than R batches ends the epoch.
 */
final class RoundRobinBatches {

    private final DataSetIterator it;
    private final int ranks;
    private final Map<Long, List<DataSet>> rounds = new HashMap<>();
    private final Map<Long, Integer> taken = new HashMap<>();
    private int epochReset = -1;
    /** A resumed run: rounds of {@code skipEpoch} done before, skipped after the reset. */
    private final int skipEpoch;
    private final int skipRounds;

    RoundRobinBatches(DataSetIterator it, int ranks, int skipEpoch, int skipRounds) {
        this.it = it;
        this.ranks = ranks;
        this.skipEpoch = skipEpoch;
        this.skipRounds = skipRounds;
    }

    /** Rank {@code rank}'s batch of round {@code step} of {@code epoch}, or null at the end of the epoch. */
    synchronized DataSet take(int epoch, int step, int rank) {
        long key = ((long) epoch << 32) | step;
        List<DataSet> round = rounds.get(key);
        if (round == null) {
            if (epochReset != epoch) {
                if (it.resetSupported()) {
                    it.reset();
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

package org.deepep4j.moe;

import org.deepep4j.EpConfig;
import org.deepep4j.EpGroup;
import org.deepep4j.EpPeerException;
import org.deepep4j.moe.train.ExpertParallelTrainer;
import org.deeplearning4j.datasets.iterator.utilty.ListDataSetIterator;
import org.deeplearning4j.nn.api.Model;
import org.deeplearning4j.optimize.api.BaseTrainingListener;
import org.deeplearning4j.optimize.api.TrainingListener;
import org.junit.jupiter.api.Test;
import org.nd4j.linalg.api.buffer.DataType;
import org.nd4j.linalg.dataset.DataSet;
import org.nd4j.linalg.learning.config.Adam;

import java.time.Duration;
import java.util.ArrayList;
import java.util.List;
import java.util.function.IntFunction;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertSame;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

/**
 * One rank fails on its own (its listener throws, its batch is bad): every rank stops within seconds, not at the 30 s
 * timeout, and fit() reports the failing rank and its root cause first.
 */
class RankFailureTest {

    private static final int HIDDEN = 8;
    private static final Duration TIMEOUT = Duration.ofSeconds(30);
    /** Well before the timeout: the peers heard of the failure, they did not wait for it. */
    private static final long PROMPT_MS = 10_000;

    /** Eight batches of 8, dealt round-robin: batch b goes to rank b % 2 at step b / 2. */
    private static List<DataSet> batches(int badBatch) {
        List<DataSet> out = new ArrayList<>();
        for (int b = 0; b < 8; b++) {
            int width = b == badBatch ? HIDDEN - 1 : HIDDEN;
            out.add(new DataSet(Nets.input(DataType.FLOAT, 10 + b, 8, width), Nets.labels(DataType.FLOAT, 20 + b, 8)));
        }
        return out;
    }

    private static IllegalStateException fitFails(List<DataSet> data, IntFunction<List<TrainingListener>> listeners,
                                                  long[] elapsedMs) {
        try (EpGroup group = EpGroup.inProcess(2)) {
            ExpertParallelTrainer.Builder b = ExpertParallelTrainer.builder()
                    .group(group, EpConfig.builder().bufferSizeGb(0.0625).timeout(TIMEOUT).build()).timeout(TIMEOUT)
                    .network(Nets.ff(DataType.FLOAT, new Adam(1e-2), Nets.moe(), HIDDEN))
                    .iterator(new ListDataSetIterator<>(data, 1));
            if (listeners != null) {
                b.rankListeners(listeners);
            }
            ExpertParallelTrainer t = b.build();
            long start = System.nanoTime();
            IllegalStateException e = assertThrows(IllegalStateException.class, t::fit);
            elapsedMs[0] = (System.nanoTime() - start) / 1_000_000;
            return e;
        }
    }

    private static IntFunction<List<TrainingListener>> throwingOnRank1At(int iteration, RuntimeException boom) {
        return rank -> List.of(new BaseTrainingListener() {
            @Override
            public void iterationDone(Model model, int it, int epoch) {
                if (rank == 1 && it == iteration) {
                    throw boom;
                }
            }
        });
    }

    @Test
    void listenerFailureOfOneRankStopsEveryRankPromptlyWithItsCause() {
        for (int iteration : new int[]{1, 3}) { // 3: the last step, after which rank 0 has nothing left to wait on
            UnsupportedOperationException boom = new UnsupportedOperationException("listener of rank 1 refuses");
            long[] ms = new long[1];
            IllegalStateException e = fitFails(batches(-1), throwingOnRank1At(iteration, boom), ms);
            assertTrue(ms[0] < PROMPT_MS, "iteration " + iteration + ": fit took " + ms[0] + " ms");
            assertEquals("rank 1 failed: java.lang.UnsupportedOperationException: listener of rank 1 refuses",
                    e.getMessage());
            assertSame(boom, e.getCause());
            assertEquals(1, e.getSuppressed().length, "rank 0's consequent error");
            // rank 0 hears of it either in the engine's step (PEER_ERROR) or in the replicated-gradient barrier the
            // failing rank aborts, depending on where rank 0 is when rank 1 fails; both must name rank 1.
            Throwable consequence = e.getSuppressed()[0];
            assertTrue((consequence instanceof EpPeerException
                    || consequence.getClass().getSimpleName().equals("RankAbortedException"))
                    && consequence.getMessage().contains("rank 1"), consequence.toString());
        }
    }

    @Test
    void badBatchOnOneRankStopsEveryRankPromptlyWithItsCause() {
        long[] ms = new long[1];
        IllegalStateException e = fitFails(batches(3), null, ms); // batch 3: rank 1, step 1
        assertTrue(ms[0] < PROMPT_MS, "fit took " + ms[0] + " ms");
        assertTrue(e.getMessage().startsWith("rank 1 failed: "), e.getMessage());
        assertTrue(!(e.getCause() instanceof EpPeerException), "root cause first: " + e.getCause());
        assertTrue(e.getMessage().contains(String.valueOf(HIDDEN - 1)), "names the bad width: " + e.getMessage());
        assertTrue(e.getSuppressed().length == 1 && e.getSuppressed()[0].getMessage().contains("rank 1"),
                "rank 0 names rank 1");
    }
}

package org.deepep4j.moe;

import org.deepep4j.moe.layers.MoELayerImpl;
import org.deepep4j.moe.train.ExpertParallelTrainer;
import org.deepep4j.moe.train.PhaseTimingListener;
import org.deeplearning4j.datasets.iterator.utilty.ListDataSetIterator;
import org.deeplearning4j.nn.conf.ComputationGraphConfiguration;
import org.deeplearning4j.nn.conf.MultiLayerConfiguration;
import org.deeplearning4j.nn.graph.ComputationGraph;
import org.deeplearning4j.nn.multilayer.MultiLayerNetwork;
import org.junit.jupiter.api.Test;
import org.nd4j.linalg.api.buffer.DataType;
import org.nd4j.linalg.api.ndarray.INDArray;
import org.nd4j.linalg.dataset.DataSet;
import org.nd4j.linalg.dataset.MultiDataSet;
import org.nd4j.linalg.dataset.api.iterator.MultiDataSetIterator;
import org.nd4j.linalg.dataset.api.iterator.TestMultiDataSetIterator;
import org.nd4j.linalg.factory.Nd4j;
import org.nd4j.linalg.learning.config.Adam;

import java.util.List;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;
import static org.nd4j.linalg.indexing.NDArrayIndex.all;
import static org.nd4j.linalg.indexing.NDArrayIndex.interval;

/**
 * Expert-parallel training in fp32 through the engine's CPU backend: two ranks train the same model as one rank (as a
 * MultiLayerNetwork and as a ComputationGraph), async combine changes nothing, the builder refuses conflicting rank
 * settings and graphs it cannot feed.
 */
class ExpertParallelTrainerTest {

    private static final int EXAMPLES = 64;
    /** The engine moves rows as 16-byte vectors: hidden 8 in fp32. */
    private static final int HIDDEN = 8;

    private static List<DataSet> data() {
        DataSet all = new DataSet(Nets.input(DataType.FLOAT, 31, EXAMPLES, HIDDEN),
                Nets.labels(DataType.FLOAT, 32, EXAMPLES));
        return all.asList();
    }

    /** 2 epochs of {@code model} (a builder with the network set) on {@code ranks} ranks, batches of {@code batch}. */
    private static ExpertParallelTrainer fit(ExpertParallelTrainer.Builder model, int ranks, int batch) {
        ExpertParallelTrainer t = model.ranks(ranks).iterator(new ListDataSetIterator<>(data(), batch)).epochs(2)
                .build();
        t.fit();
        return t;
    }

    private static MultiLayerNetwork train(int ranks, int batch, boolean async, PhaseTimingListener timing) {
        MultiLayerConfiguration conf = Nets.ff(DataType.FLOAT, new Adam(1e-2),
                Nets.moe().sharedExpertFfnSize(4).asyncCombine(async), HIDDEN);
        ExpertParallelTrainer.Builder b = ExpertParallelTrainer.builder().network(conf);
        if (timing != null) {
            b.listeners(timing);
        }
        return fit(b, ranks, batch).wholeNetwork();
    }

    private static ComputationGraphConfiguration graph() {
        return Nets.graph(DataType.FLOAT, new Adam(1e-2), Nets.moe().sharedExpertFfnSize(4), HIDDEN);
    }

    /** 1 rank with batch 2B and 2 ranks with batch B: the same training, up to fp32 rounding, and it moved. */
    private static void assertTrainedAlike(INDArray initial, INDArray one, INDArray two,
                                           INDArray outOne, INDArray outTwo) {
        double moved = one.sub(initial).norm2Number().doubleValue();
        assertTrue(moved > 1e-2, "training moved the parameters by " + moved);
        double maxDiff = one.sub(two).amaxNumber().doubleValue();
        assertTrue(maxDiff < 1e-4, "EP=1 and EP=2 parameters differ by up to " + maxDiff);
        assertTrue(outOne.equalsWithEps(outTwo, 1e-4), "EP=1 and EP=2 outputs differ");
    }

    @Test
    void twoRanksTrainLikeOne() {
        MultiLayerNetwork initial = new MultiLayerNetwork(Nets.ff(DataType.FLOAT, new Adam(1e-2),
                Nets.moe().sharedExpertFfnSize(4), HIDDEN));
        initial.init();
        MultiLayerNetwork one = train(1, 16, false, null);
        MultiLayerNetwork two = train(2, 8, false, null);
        INDArray x = Nets.input(DataType.FLOAT, 33, 5, HIDDEN);
        assertTrainedAlike(initial.params(), one.params(), two.params(), one.output(x), two.output(x));
    }

    @Test
    void twoRanksTrainAGraphLikeOne() {
        ComputationGraph initial = new ComputationGraph(graph());
        initial.init();
        ExpertParallelTrainer oneRank = fit(ExpertParallelTrainer.builder().network(graph()), 1, 16);
        ExpertParallelTrainer twoRanks = fit(ExpertParallelTrainer.builder().network(graph()), 2, 8);
        ComputationGraph one = oneRank.wholeGraph();
        ComputationGraph two = twoRanks.wholeGraph();
        java.util.Set<String> rank1 = twoRanks.replicaGraph(1).getLayer("moe").paramTable().keySet();
        assertTrue(rank1.contains("e1W1") && !rank1.contains("e2W1"), "rank 1's MoE vertex holds 2 of 4: " + rank1);
        INDArray x = Nets.input(DataType.FLOAT, 33, 5, HIDDEN);
        assertTrainedAlike(initial.params(), one.params(), two.params(), one.outputSingle(x), two.outputSingle(x));
        IllegalStateException e = assertThrows(IllegalStateException.class, twoRanks::wholeNetwork);
        assertTrue(e.getMessage().contains("ComputationGraph; use wholeGraph()"), e.getMessage());
    }

    @Test
    void aGraphsMoEVertexTrainsOnTheEngineBlockAsOnTheJavaPath() {
        ComputationGraph java = fit(ExpertParallelTrainer.builder().network(graph()), 2, 8).wholeGraph();
        ExpertParallelTrainer t = fit(ExpertParallelTrainer.builder().network(Nets.graph(DataType.FLOAT, new Adam(1e-2),
                Nets.moe().sharedExpertFfnSize(4).engineBlock(true), HIDDEN)), 2, 8);
        MoELayerImpl moe = (MoELayerImpl) t.replicaGraph(1).getLayer("moe");
        assertEquals(EXAMPLES / 8 / 2 * 2, moe.viewSynchronizations(), "the engine stepped the experts every step");
        double worst = java.params().sub(t.wholeGraph().params()).amaxNumber().doubleValue();
        assertTrue(worst < 2e-4, "engine block and Java path parameters differ by up to " + worst);
    }

    /** data() as MultiDataSets of one example: features split into inputs a (first half) and b (second half). */
    private static MultiDataSetIterator twoInputData(int batch) {
        List<org.nd4j.linalg.dataset.api.MultiDataSet> examples = new java.util.ArrayList<>();
        for (DataSet d : data()) {
            INDArray x = d.getFeatures();
            examples.add(new MultiDataSet(new INDArray[]{x.get(all(), interval(0, HIDDEN / 2)),
                    x.get(all(), interval(HIDDEN / 2, HIDDEN))}, new INDArray[]{d.getLabels()}));
        }
        return new TestMultiDataSetIterator(batch, examples.toArray(new org.nd4j.linalg.dataset.api.MultiDataSet[0]));
    }

    @Test
    void twoRanksTrainATwoInputGraphFromMultiDataSetsLikeOne() {
        ComputationGraphConfiguration conf = Nets.twoInputGraph(DataType.FLOAT, new Adam(1e-2), Nets.moe(), HIDDEN);
        ComputationGraph initial = new ComputationGraph(conf);
        initial.init();
        ComputationGraph[] trained = new ComputationGraph[2];
        for (int ranks = 1; ranks <= 2; ranks++) {
            ExpertParallelTrainer t = ExpertParallelTrainer.builder().ranks(ranks).network(conf)
                    .iterator(twoInputData(16 / ranks)).epochs(2).build();
            t.fit();
            trained[ranks - 1] = t.wholeGraph();
        }
        INDArray a = Nets.input(DataType.FLOAT, 33, 5, HIDDEN / 2);
        INDArray b = Nets.input(DataType.FLOAT, 34, 5, HIDDEN / 2);
        assertTrainedAlike(initial.params(), trained[0].params(), trained[1].params(),
                trained[0].outputSingle(a, b), trained[1].outputSingle(a, b));
    }

    @Test
    void aGraphADataSetIteratorCannotFeedIsRefusedNamingItsInputs() {
        ComputationGraphConfiguration twoInputs = Nets.twoInputGraph(DataType.FLOAT, new Adam(1e-2), Nets.moe(), HIDDEN);
        IllegalArgumentException e = assertThrows(IllegalArgumentException.class, () -> ExpertParallelTrainer.builder()
                .ranks(2).network(twoInputs).iterator(new ListDataSetIterator<>(data(), 8)).build());
        assertTrue(e.getMessage().contains("inputs [a, b] and outputs [out]")
                && e.getMessage().contains("exactly one input and one output")
                && e.getMessage().contains("MultiDataSetIterator"), e.getMessage());
    }

    @Test
    void asyncCombineGivesIdenticalResults() {
        PhaseTimingListener timing = new PhaseTimingListener();
        MultiLayerNetwork sync = train(2, 8, false, null);
        MultiLayerNetwork async = train(2, 8, true, timing);
        assertEquals(sync.params(), async.params());
        assertFalse(timing.lastTimes().isEmpty(), "phase timing was reported");
        assertTrue(timing.lastTimes().get(1).expertMs() > 0);
    }

    @Test
    void rankListenersSeeEachRanksRoutingAndReceivedRows() {
        int ranks = 2;
        int experts = 4;
        int local = experts / ranks;
        List<List<int[]>> chosen = new java.util.ArrayList<>();
        List<List<int[]>> received = new java.util.ArrayList<>();
        Thread[] threads = new Thread[ranks];
        for (int r = 0; r < ranks; r++) {
            chosen.add(new java.util.ArrayList<>());
            received.add(new java.util.ArrayList<>());
        }
        ExpertParallelTrainer t = ExpertParallelTrainer.builder().ranks(ranks)
                .network(Nets.ff(DataType.FLOAT, new Adam(1e-2), Nets.moe(), HIDDEN))
                .iterator(new ListDataSetIterator<>(data(), 8)).epochs(2)
                .rankListeners(rank -> {
                    threads[rank] = Thread.currentThread();
                    return List.of(new org.deeplearning4j.optimize.api.BaseTrainingListener() {
                        @Override
                        public void iterationDone(org.deeplearning4j.nn.api.Model model, int iteration, int epoch) {
                            assertEquals(threads[rank], Thread.currentThread());
                            org.deepep4j.moe.layers.MoELayerImpl moe = (org.deepep4j.moe.layers.MoELayerImpl)
                                    ((MultiLayerNetwork) model).getLayer(1);
                            chosen.get(rank).add(moe.lastLoad());
                            received.get(rank).add(moe.lastReceived());
                        }
                    });
                })
                .build();
        t.fit();
        int steps = EXAMPLES / 8 / ranks * 2;
        for (int r = 0; r < ranks; r++) {
            assertEquals(steps, chosen.get(r).size(), "iterations seen by rank " + r);
            assertEquals(steps, received.get(r).size(), "iterations seen by rank " + r);
        }
        for (int s = 0; s < steps; s++) {
            for (int e = 0; e < experts; e++) {
                int sent = 0;
                for (int r = 0; r < ranks; r++) {
                    sent += chosen.get(r).get(s)[e];
                }
                assertEquals(sent, received.get(e / local).get(s)[e % local], "step " + s + " expert " + e);
            }
        }
    }

    @Test
    void defaultPathMovesTokensThroughTheEngine() {
        // ranks(2) alone must train through deepep4j's EpBuffer: the exchange bound to each replica is the engine's
        ExpertParallelTrainer t = ExpertParallelTrainer.builder().ranks(2)
                .network(Nets.ff(DataType.FLOAT, new Adam(1e-2), Nets.moe(), HIDDEN))
                .iterator(new ListDataSetIterator<>(data(), 8))
                .rankListeners(rank -> List.of(new org.deeplearning4j.optimize.api.BaseTrainingListener() {
                    @Override
                    public void iterationDone(org.deeplearning4j.nn.api.Model model, int iteration, int epoch) {
                        org.deepep4j.moe.layers.MoELayerImpl moe = (org.deepep4j.moe.layers.MoELayerImpl)
                                ((MultiLayerNetwork) model).getLayer(1);
                        exchangeTypes.add(moe.getExchange().getClass().getSimpleName());
                    }
                })).build();
        t.fit();
        assertEquals(java.util.Set.of("EpBufferExchange"), java.util.Set.copyOf(exchangeTypes));
        // a width the engine cannot move is refused by it, naming x: there is no silent Java fallback
        ExpertParallelTrainer odd = ExpertParallelTrainer.builder().ranks(2)
                .network(Nets.ff(DataType.FLOAT, new Adam(1e-2), Nets.moe(), 6))
                .iterator(new ListDataSetIterator<>(new DataSet(Nets.input(DataType.FLOAT, 3, 16, 6),
                        Nets.labels(DataType.FLOAT, 4, 16)).asList(), 8)).build();
        RuntimeException e = org.junit.jupiter.api.Assertions.assertThrows(RuntimeException.class, odd::fit);
        assertTrue(String.valueOf(e.getMessage()).contains("multiple of 16"), String.valueOf(e.getMessage()));
    }

    private final List<String> exchangeTypes = java.util.Collections.synchronizedList(new java.util.ArrayList<>());

    @Test
    void conflictingRankSettingsAreRefusedNamingTheFirst() {
        try (org.deepep4j.EpGroup g = org.deepep4j.EpGroup.inProcess(2)) {
            IllegalStateException e = org.junit.jupiter.api.Assertions.assertThrows(IllegalStateException.class,
                    () -> ExpertParallelTrainer.builder().ranks(3).group(g, org.deepep4j.EpConfig.defaults()));
            assertTrue(e.getMessage().startsWith("group(in-process EpGroup of 2 ranks)")
                    && e.getMessage().contains("already set by ranks(3)"), e.getMessage());
            e = org.junit.jupiter.api.Assertions.assertThrows(IllegalStateException.class,
                    () -> ExpertParallelTrainer.builder().group(g, org.deepep4j.EpConfig.defaults()).ranks(2));
            assertTrue(e.getMessage().contains("already set by group(in-process EpGroup of 2 ranks)"), e.getMessage());
            e = org.junit.jupiter.api.Assertions.assertThrows(IllegalStateException.class,
                    () -> ExpertParallelTrainer.builder().exchanges(2, r -> null).ranks(4));
            assertTrue(e.getMessage().contains("already set by exchanges(2, ...)"), e.getMessage());
            e = org.junit.jupiter.api.Assertions.assertThrows(IllegalStateException.class,
                    () -> ExpertParallelTrainer.builder().ranks(2).ranks(2));
            assertTrue(e.getMessage().contains("already set by ranks(2)"), e.getMessage());
        }
        IllegalArgumentException e = org.junit.jupiter.api.Assertions.assertThrows(IllegalArgumentException.class,
                () -> ExpertParallelTrainer.builder().network(Nets.ff(DataType.FLOAT, new Adam(1e-2), Nets.moe()))
                        .iterator(new ListDataSetIterator<>(data(), 8)).build());
        assertTrue(e.getMessage().startsWith("ranks=unset"), e.getMessage());
    }

    @Test
    void aClosedGroupIsRefusedByTheBuilderAndByFit() {
        org.deepep4j.EpGroup closed = org.deepep4j.EpGroup.inProcess(2);
        closed.close();
        IllegalStateException e = org.junit.jupiter.api.Assertions.assertThrows(IllegalStateException.class,
                () -> ExpertParallelTrainer.builder().group(closed, org.deepep4j.EpConfig.defaults()));
        assertTrue(e.getMessage().startsWith("ExpertParallelTrainer.Builder.group: this EpGroup of 2 ranks is closed"),
                e.getMessage());
        org.deepep4j.EpGroup group = org.deepep4j.EpGroup.inProcess(2);
        ExpertParallelTrainer t = ExpertParallelTrainer.builder().group(group, org.deepep4j.EpConfig.defaults())
                .network(Nets.ff(DataType.FLOAT, new Adam(1e-2), Nets.moe(), HIDDEN))
                .iterator(new ListDataSetIterator<>(data(), 8)).build();
        group.close();
        e = org.junit.jupiter.api.Assertions.assertThrows(IllegalStateException.class, t::fit);
        assertTrue(e.getMessage().startsWith("ExpertParallelTrainer.fit: this EpGroup of 2 ranks is closed"),
                e.getMessage());
    }

    @Test
    void badTrainerSettingsAreRejected() {
        MultiLayerConfiguration conf = Nets.ff(DataType.FLOAT, new Adam(1e-2), Nets.moe());
        IllegalArgumentException e = org.junit.jupiter.api.Assertions.assertThrows(IllegalArgumentException.class,
                () -> ExpertParallelTrainer.builder().ranks(3).network(conf)
                        .iterator(new ListDataSetIterator<>(data(), 8)).build());
        assertTrue(e.getMessage().contains("numExperts=4") && e.getMessage().contains("epSize=3"), e.getMessage());
        e = org.junit.jupiter.api.Assertions.assertThrows(IllegalArgumentException.class,
                () -> ExpertParallelTrainer.builder().ranks(0).network(conf).build());
        assertTrue(e.getMessage().contains("ranks=0"), e.getMessage());
    }
}

package org.deepep4j.moe;

import org.deepep4j.EpConfig;
import org.deepep4j.EpGroup;
import org.deepep4j.moe.train.ExpertParallelTrainer;
import org.deeplearning4j.datasets.iterator.utilty.ListDataSetIterator;
import org.deeplearning4j.nn.multilayer.MultiLayerNetwork;
import org.junit.jupiter.params.ParameterizedTest;
import org.junit.jupiter.params.provider.ValueSource;
import org.nd4j.linalg.api.buffer.DataType;
import org.nd4j.linalg.api.ndarray.INDArray;
import org.nd4j.linalg.dataset.DataSet;
import org.nd4j.linalg.learning.config.Adam;

import java.time.Duration;
import java.util.ArrayList;
import java.util.List;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

/**
 * NaN input: a clear error naming the layer, the rank and the first bad row, alone and in expert-parallel training;
 * the same on the Java path and on the engine-block path (CPU engine here; the check runs before the engine is called).
 */
class NanInputTest {

    private static final String RULE = "; the router needs finite values to choose experts";

    @ParameterizedTest
    @ValueSource(booleans = {false, true})
    void nanRowIsNamedByLayerRankAndRow(boolean engineBlock) {
        MultiLayerNetwork net = new MultiLayerNetwork(Nets.ff(DataType.FLOAT, new Adam(1e-2),
                Nets.moe().name("moe").engineBlock(engineBlock), 8));
        net.init();
        INDArray x = Nets.input(DataType.FLOAT, 1, 5, 8);
        x.putScalar(3, 2, Double.NaN);
        x.putScalar(4, 1, Double.NaN);
        IllegalArgumentException e = assertThrows(IllegalArgumentException.class, () -> net.output(x));
        // the dense layer before spreads row 3's NaN over all its columns
        assertTrue(e.getMessage().startsWith("MoELayer 'moe' (layer 1) on rank 0: input row 3 of 5 has NaN at column 0"
                + RULE), e.getMessage());
    }

    @ParameterizedTest
    @ValueSource(booleans = {false, true})
    void infinityInRecurrentInputIsNamedByExampleAndTimeStep(boolean engineBlock) {
        int t = 4;
        int nIn = 8;  // the engine block's rows must be a multiple of 16 bytes
        MultiLayerNetwork net = new MultiLayerNetwork(Nets.rnn(DataType.FLOAT, new Adam(1e-2),
                Nets.moe().engineBlock(engineBlock), t, nIn));
        net.init();
        INDArray x = Nets.input(DataType.FLOAT, 2, 3, nIn, t);
        x.putScalar(new int[]{1, 4, 2}, Double.POSITIVE_INFINITY);
        IllegalArgumentException e = assertThrows(IllegalArgumentException.class, () -> net.output(x));
        assertTrue(e.getMessage().startsWith("MoELayer 'layer0' (layer 0) on rank 0: input token 6 (example 1, time step 2) of 12"
                + " has Infinity at column 4" + RULE), e.getMessage());
    }

    @ParameterizedTest
    @ValueSource(booleans = {false, true})
    void nanBatchOnOneRankStopsExpertParallelTrainingWithItsCause(boolean engineBlock) {
        List<DataSet> batches = new ArrayList<>();
        for (int b = 0; b < 8; b++) {
            INDArray x = Nets.input(DataType.FLOAT, 30 + b, 8, 8);
            if (b == 3) { // rank 1, step 1
                x.putScalar(5, 7, Double.NaN);
            }
            batches.add(new DataSet(x, Nets.labels(DataType.FLOAT, 40 + b, 8)));
        }
        Duration timeout = Duration.ofSeconds(30);
        try (EpGroup group = EpGroup.inProcess(2)) {
            ExpertParallelTrainer t = ExpertParallelTrainer.builder()
                    .group(group, EpConfig.builder().bufferSizeGb(0.0625).timeout(timeout).build()).timeout(timeout)
                    .network(Nets.ff(DataType.FLOAT, new Adam(1e-2), Nets.moe().name("moe").engineBlock(engineBlock), 8))
                    .iterator(new ListDataSetIterator<>(batches, 1)).build();
            long start = System.nanoTime();
            IllegalStateException e = assertThrows(IllegalStateException.class, t::fit);
            long ms = (System.nanoTime() - start) / 1_000_000;
            assertTrue(ms < 10_000, "fit took " + ms + " ms of a 30 s timeout: " + e);
            assertTrue(e.getMessage().startsWith("rank 1 failed: java.lang.IllegalArgumentException: MoELayer 'moe'"
                    + " (layer 1) on rank 1: input row 5 of 8 has NaN at column 0" + RULE), e.getMessage());
            assertEquals(IllegalArgumentException.class, e.getCause().getClass());
        }
    }
}

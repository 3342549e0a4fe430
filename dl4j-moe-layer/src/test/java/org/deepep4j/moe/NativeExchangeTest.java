package org.deepep4j.moe;

import org.deepep4j.EpConfig;
import org.deepep4j.EpGroup;
import org.deepep4j.moe.exchange.EpBufferExchange;
import org.deepep4j.moe.exchange.ExpertExchange;
import org.deepep4j.moe.exchange.JavaExchangeGroup;
import org.deepep4j.moe.train.ExpertParallelTrainer;
import org.deeplearning4j.datasets.iterator.utilty.ListDataSetIterator;
import org.deeplearning4j.nn.conf.MultiLayerConfiguration;
import org.deeplearning4j.nn.multilayer.MultiLayerNetwork;
import org.junit.jupiter.api.Test;
import org.nd4j.linalg.api.buffer.DataType;
import org.nd4j.linalg.api.ndarray.INDArray;
import org.nd4j.linalg.dataset.DataSet;
import org.nd4j.linalg.factory.Nd4j;
import org.nd4j.linalg.learning.config.Adam;

import java.time.Duration;
import java.util.List;
import java.util.function.IntFunction;

import static org.junit.jupiter.api.Assertions.assertTrue;

/** The MoE layer over deepep4j's native EpBuffer (CPU ranks): same training as the plain-Java exchange and as EP=1. */
class NativeExchangeTest {

    private static final int EXAMPLES = 48;
    private static final int HIDDEN = 8;

    private static MultiLayerNetwork train(int ranks, int batch, boolean async, IntFunction<ExpertExchange> exchanges) {
        // the engine moves rows as 16-byte vectors: hidden 8 in fp32
        MultiLayerConfiguration conf = Nets.ff(DataType.FLOAT, new Adam(1e-2), Nets.moe().sharedExpertFfnSize(4)
                .asyncCombine(async), HIDDEN);
        List<DataSet> data = new DataSet(Nets.input(DataType.FLOAT, 41, EXAMPLES, HIDDEN),
                Nets.labels(DataType.FLOAT, 42, EXAMPLES)).asList();
        ExpertParallelTrainer t = ExpertParallelTrainer.builder().exchanges(ranks, exchanges).network(conf)
                .iterator(new ListDataSetIterator<>(data, batch)).epochs(2).build();
        t.fit();
        return t.wholeNetwork();
    }

    private static IntFunction<ExpertExchange> epBuffers(EpGroup group) {
        EpConfig cfg = EpConfig.builder().bufferSizeGb(0.0625).timeout(Duration.ofSeconds(60)).build();
        return rank -> new EpBufferExchange(group.buffer(rank, cfg), true);
    }

    @Test
    void nativeTwoRanksMatchJavaExchangeAndOneRank() {
        MultiLayerNetwork nativeTwo;
        try (EpGroup g = EpGroup.inProcess(2)) {
            nativeTwo = train(2, 8, true, epBuffers(g)); // combine overlapped with the shared expert
        }
        MultiLayerNetwork javaTwo = train(2, 8, false, new JavaExchangeGroup(2, Duration.ofSeconds(60))::rank);
        MultiLayerNetwork nativeOne;
        try (EpGroup g = EpGroup.inProcess(1)) {
            nativeOne = train(1, 16, false, epBuffers(g));
        }
        double javaDiff = nativeTwo.params().sub(javaTwo.params()).amaxNumber().doubleValue();
        double oneDiff = nativeTwo.params().sub(nativeOne.params()).amaxNumber().doubleValue();
        assertTrue(javaDiff < 1e-5, "native and Java exchanges differ by " + javaDiff);
        assertTrue(oneDiff < 1e-4, "EP=2 and EP=1 over EpBuffer differ by " + oneDiff);
        INDArray x = Nets.input(DataType.FLOAT, 43, 4, HIDDEN);
        assertTrue(nativeTwo.output(x).equalsWithEps(nativeOne.output(x), 1e-4));
    }

    @Test
    void doublePrecisionIsRejectedByTheEngine() {
        MultiLayerConfiguration conf = org.deepep4j.moe.train.ExpertSharding.withEpSize(
                Nets.ff(DataType.DOUBLE, new Adam(1e-2), Nets.moe()), 1);
        try (EpGroup g = EpGroup.inProcess(1)) {
            List<String> messages = g.runOnAllRanks(rank -> {
                MultiLayerNetwork net = new MultiLayerNetwork(conf.clone());
                net.init();
                try (EpBufferExchange ex = new EpBufferExchange(g.buffer(rank, EpConfig.builder().bufferSizeGb(0.0625)
                        .build()), true)) {
                    ((org.deepep4j.moe.layers.MoELayerImpl) net.getLayer(1)).setExchange(ex);
                    net.output(Nd4j.rand(DataType.DOUBLE, 3, Nets.N_IN));
                    return "no error";
                } catch (RuntimeException e) {
                    return e.getMessage();
                }
            }, Duration.ofSeconds(60));
            assertTrue(messages.get(0).contains("x"), messages.get(0));
            assertTrue(messages.get(0).toLowerCase().contains("double"), messages.get(0));
        }
    }
}

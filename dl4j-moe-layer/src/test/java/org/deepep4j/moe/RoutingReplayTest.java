package org.deepep4j.moe;

import org.deepep4j.moe.layers.MoELayerImpl;
import org.deepep4j.moe.layers.RoutingMode;
import org.deepep4j.moe.params.MoEParamInitializer;
import org.deeplearning4j.nn.multilayer.MultiLayerNetwork;
import org.junit.jupiter.api.Test;
import org.nd4j.linalg.api.buffer.DataType;
import org.nd4j.linalg.api.ndarray.INDArray;
import org.nd4j.linalg.factory.Nd4j;
import org.nd4j.linalg.learning.config.Sgd;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertNotEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

/** A forward records its routing; a recompute after the router changed replays it instead of routing afresh. */
class RoutingReplayTest {

    @Test
    void replayKeepsTheRecordedExpertsAndRejectsOtherShapes() {
        MultiLayerNetwork net = new MultiLayerNetwork(Nets.ff(DataType.FLOAT, new Sgd(0.1), Nets.moe()));
        net.init();
        MoELayerImpl moe = (MoELayerImpl) net.getLayer(1);
        INDArray x = Nets.input(DataType.FLOAT, 1, 32, Nets.N_IN);

        moe.setRoutingMode(RoutingMode.RECORD);
        INDArray before = net.output(x);
        INDArray recorded = moe.getRecordedRouting().dup();
        assertEquals(32, recorded.size(0));
        assertEquals(2, recorded.size(1));

        // A different router picks other experts ...
        Nd4j.getRandom().setSeed(99);
        moe.getParam(MoEParamInitializer.ROUTER_WEIGHT).assign(Nd4j.randn(DataType.FLOAT, Nets.N_IN, 4).muli(3));
        moe.setRoutingMode(RoutingMode.RECORD);
        net.output(x);
        assertNotEquals(recorded, moe.getRecordedRouting(), "the new router routes differently");

        // ... unless the recorded routing is replayed.
        moe.replayRouting(recorded);
        INDArray replayed = net.output(x);
        assertEquals(RoutingMode.REPLAY, moe.getRoutingMode());
        int[] load = moe.lastLoad();
        int[] expected = new int[4];
        for (long e : recorded.data().asLong()) {
            expected[(int) e]++;
        }
        assertEquals(java.util.Arrays.toString(expected), java.util.Arrays.toString(load));
        assertNotEquals(before, replayed, "weights still come from the current router scores");

        // Training with replay runs forward and backward on the recorded choices.
        net.fit(x, Nets.labels(DataType.FLOAT, 2, 32));
        assertEquals(java.util.Arrays.toString(expected), java.util.Arrays.toString(moe.lastLoad()));

        IllegalStateException e = assertThrows(IllegalStateException.class,
                () -> net.output(Nets.input(DataType.FLOAT, 3, 8, Nets.N_IN)));
        assertTrue(e.getMessage().contains("routing replay") && e.getMessage().contains("[32, 2]")
                && e.getMessage().contains("8 tokens") && e.getMessage().contains("requires the same tokens"),
                e.getMessage());

        moe.setRoutingMode(RoutingMode.NORMAL);
        assertEquals(8, net.output(Nets.input(DataType.FLOAT, 3, 8, Nets.N_IN)).size(0));
    }
}

package org.deepep4j.moe;

import org.deepep4j.moe.conf.MoELayer;
import org.deepep4j.moe.layers.MoELayerImpl;
import org.deepep4j.moe.params.MoEParamInitializer;
import org.deeplearning4j.nn.conf.inputs.InputType;
import org.deeplearning4j.nn.conf.memory.LayerMemoryReport;
import org.deeplearning4j.nn.multilayer.MultiLayerNetwork;
import org.junit.jupiter.api.Test;
import org.nd4j.linalg.api.buffer.DataType;
import org.nd4j.linalg.api.ndarray.INDArray;
import org.nd4j.linalg.learning.config.Adam;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

/** Aux-loss-free balancing moves the selection bias against the load; the aux loss joins the score. */
class LoadBalancingTest {

    @Test
    void selectionBiasStepsAgainstTheLoad() {
        double rate = 0.05;
        MultiLayerNetwork net = new MultiLayerNetwork(Nets.ff(DataType.FLOAT, new Adam(1e-2), Nets.moe()
                .biasUpdateRate(rate)));
        net.init();
        MoELayerImpl moe = (MoELayerImpl) net.getLayer(1);
        // Skew the router so the load is uneven.
        moe.getParam(MoEParamInitializer.ROUTER_WEIGHT).getColumn(0).addi(2.0);
        INDArray x = Nets.input(DataType.FLOAT, 1, 40, Nets.N_IN);
        INDArray biasBefore = moe.getParam(MoEParamInitializer.ROUTER_BIAS).dup();
        net.fit(x, Nets.labels(DataType.FLOAT, 2, 40));
        int[] load = moe.lastLoad();
        double mean = 40 * 2 / 4.0;
        INDArray bias = moe.getParam(MoEParamInitializer.ROUTER_BIAS);
        boolean uneven = false;
        for (int e = 0; e < 4; e++) {
            double expected = biasBefore.getDouble(e) + rate * Math.signum(mean - load[e]);
            assertEquals(expected, bias.getDouble(e), 1e-6, "bias of expert " + e + " with load " + load[e]);
            uneven |= load[e] != mean;
        }
        assertTrue(uneven, "the skewed router gives an uneven load");
    }

    @Test
    void auxLossIsPartOfTheScore() {
        MultiLayerNetwork plain = new MultiLayerNetwork(Nets.ff(DataType.DOUBLE, new Adam(1e-2), Nets.moe()));
        plain.init();
        MultiLayerNetwork aux = new MultiLayerNetwork(Nets.ff(DataType.DOUBLE, new Adam(1e-2),
                Nets.moe().auxLossCoefficient(0.5)));
        aux.init();
        aux.setParams(plain.params());
        org.nd4j.linalg.dataset.DataSet ds = new org.nd4j.linalg.dataset.DataSet(
                Nets.input(DataType.DOUBLE, 3, 20, Nets.N_IN), Nets.labels(DataType.DOUBLE, 4, 20));
        double difference = aux.score(ds) - plain.score(ds);
        double auxLoss = ((MoELayerImpl) aux.getLayer(1)).auxLoss();
        // balanced routing gives coef * E * sum f P = coef; any imbalance raises it
        assertTrue(auxLoss >= 0.5 * 0.99, "aux loss " + auxLoss);
        assertEquals(auxLoss, difference, 1e-9);
    }

    @Test
    void memoryReport() {
        MoELayer conf = (MoELayer) Nets.ff(DataType.FLOAT, new Adam(1e-2), Nets.moe().sharedExpertFfnSize(3))
                .getConf(1).getLayer();
        LayerMemoryReport r = conf.getMemoryReport(InputType.feedForward(Nets.N_IN));
        long params = 6 * 4 + 4 + 4 * (3 * 6 * 5) + 3 * 6 * 3;
        assertEquals(params, r.getParameterSize());
        // Adam keeps two values per parameter; the selection bias (4 values) has no optimiser state
        assertEquals(2 * (params - 4), r.getUpdaterStateSize());
        assertEquals(params, conf.initializer().numParams(conf));
    }
}

package org.deepep4j.moe;

import org.deepep4j.moe.exchange.JavaExchangeGroup;
import org.deepep4j.moe.layers.MoELayerImpl;
import org.deepep4j.moe.params.MoEParamInitializer;
import org.deepep4j.moe.train.ExpertSharding;
import org.deeplearning4j.nn.api.Layer;
import org.deeplearning4j.nn.conf.MultiLayerConfiguration;
import org.deeplearning4j.nn.multilayer.MultiLayerNetwork;
import org.junit.jupiter.api.BeforeAll;
import org.junit.jupiter.api.Test;
import org.nd4j.linalg.api.buffer.DataType;
import org.nd4j.linalg.api.ndarray.INDArray;
import org.nd4j.linalg.factory.Nd4j;
import org.nd4j.linalg.indexing.NDArrayIndex;
import org.nd4j.linalg.learning.config.NoOp;

import java.time.Duration;
import java.util.List;
import java.util.Map;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

/**
 * Gradients with experts split over two in-process ranks (double precision): equal to the one-rank gradients of the
 * same global weights and data, and equal to central differences of the summed loss of both ranks.
 */
class ExpertParallelGradientTest {

    private static final int R = 2;
    private static final int MB = 6;

    @BeforeAll
    static void doublePrecision() {
        Nd4j.setDefaultDataTypes(DataType.DOUBLE, DataType.DOUBLE);
    }

    /** Replicas of {@code whole} for R ranks, bound to one in-process exchange group. */
    private static MultiLayerNetwork[] replicas(MultiLayerConfiguration conf, MultiLayerNetwork whole) {
        JavaExchangeGroup group = new JavaExchangeGroup(R, Duration.ofSeconds(60));
        MultiLayerConfiguration sharded = ExpertSharding.withEpSize(conf, R);
        MultiLayerNetwork[] nets = new MultiLayerNetwork[R];
        for (int r = 0; r < R; r++) {
            nets[r] = new MultiLayerNetwork(sharded.clone());
            nets[r].init();
            ExpertSharding.scatter(whole, nets[r], r);
            for (Layer l : nets[r].getLayers()) {
                if (l instanceof MoELayerImpl) {
                    ((MoELayerImpl) l).setExchange(group.rank(r));
                }
            }
        }
        return nets;
    }

    private static INDArray rows(INDArray a, int rank) {
        return a.get(NDArrayIndex.interval(rank * MB, (rank + 1) * MB), NDArrayIndex.all()).dup();
    }

    /** Sum over ranks of minibatch size x score, i.e. the objective whose gradient DL4J's backprop returns. */
    private static double totalObjective(MultiLayerNetwork[] nets, INDArray x, INDArray y) {
        List<Double> s = Ranks.run(R, r -> {
            nets[r].setInput(rows(x, r));
            nets[r].setLabels(rows(y, r));
            nets[r].computeGradientAndScore();
            return nets[r].score() * MB;
        });
        return s.stream().mapToDouble(Double::doubleValue).sum();
    }

    @Test
    void twoRanksGiveTheOneRankGradients() {
        MultiLayerConfiguration conf = Nets.ff(DataType.DOUBLE, new NoOp(), Nets.moe().sharedExpertFfnSize(3));
        MultiLayerNetwork whole = new MultiLayerNetwork(conf.clone());
        whole.init();
        INDArray x = Nets.input(DataType.DOUBLE, 11, R * MB, Nets.N_IN);
        INDArray y = Nets.labels(DataType.DOUBLE, 12, R * MB);
        whole.setInput(x);
        whole.setLabels(y);
        whole.computeGradientAndScore();
        INDArray expected = whole.getFlattenedGradients().dup();
        double expectedObjective = whole.score() * R * MB;

        MultiLayerNetwork[] nets = replicas(conf, whole);
        double objective = totalObjective(nets, x, y);
        assertEquals(expectedObjective, objective, 1e-9 * Math.abs(expectedObjective));

        // Put the replicas' gradients into the whole model's layout: replicated ones summed, experts from their owner.
        MultiLayerNetwork sum = new MultiLayerNetwork(conf.clone());
        sum.init();
        sum.params().assign(0.0);
        for (int r = 0; r < R; r++) {
            for (int i = 0; i < nets[r].getnLayers(); i++) {
                Layer layer = nets[r].getLayer(i);
                Map<String, INDArray> grads = layer.conf().getLayer().initializer()
                        .getGradientsFromFlattened(layer.conf(), layer.getGradientsViewArray());
                int local = layer instanceof MoELayerImpl ? 4 / R : 0;
                for (Map.Entry<String, INDArray> g : grads.entrySet()) {
                    String key = g.getKey();
                    if (layer instanceof MoELayerImpl && MoEParamInitializer.isExpertParam(key)) {
                        key = MoEParamInitializer.withExpertIndex(key, r * local + MoEParamInitializer.expertIndex(key));
                    }
                    sum.getLayer(i).getParam(key).addi(g.getValue());
                }
            }
        }
        INDArray got = sum.params();
        double maxDiff = Nd4j.getExecutioner().exec(new org.nd4j.linalg.api.ops.impl.reduce.same.AMax(
                got.sub(expected))).getDouble(0);
        double scale = Nd4j.getExecutioner().exec(new org.nd4j.linalg.api.ops.impl.reduce.same.AMax(expected))
                .getDouble(0);
        assertTrue(scale > 1e-3, "gradient is not trivially zero");
        assertTrue(maxDiff <= 1e-10 * scale, "EP=2 gradients differ from EP=1 by " + maxDiff + " (scale " + scale + ")");
    }

    @Test
    void twoRankGradientsMatchCentralDifferences() {
        MultiLayerConfiguration conf = Nets.ff(DataType.DOUBLE, new NoOp(),
                Nets.moe().auxLossCoefficient(0.05).sharedExpertFfnSize(2).asyncCombine(true));
        MultiLayerNetwork whole = new MultiLayerNetwork(conf.clone());
        whole.init();
        MultiLayerNetwork[] nets = replicas(conf, whole);
        INDArray x = Nets.input(DataType.DOUBLE, 21, R * MB, Nets.N_IN);
        INDArray y = Nets.labels(DataType.DOUBLE, 22, R * MB);
        totalObjective(nets, x, y);
        INDArray[] analytic = new INDArray[R];
        for (int r = 0; r < R; r++) {
            analytic[r] = nets[r].getFlattenedGradients().dup();
        }
        INDArray replicated = org.deepep4j.moe.train.ExpertParallelTestAccess.replicatedMask(nets[0]);
        double eps = 1e-6;
        int checked = 0;
        for (int rank = 0; rank < R; rank++) {
            for (long p = 0; p < nets[0].numParams(); p++) {
                boolean shared = replicated.getDouble(p) == 1.0;
                if (!inMoe(nets[0], p) && p % 5 != 0) {
                    continue; // every MoE parameter, a sample of the others
                }
                if (shared && rank > 0) {
                    continue; // a replicated parameter is one global parameter: perturb it on every rank once
                }
                double g = shared ? analytic[0].getDouble(p) + analytic[1].getDouble(p) : analytic[rank].getDouble(p);
                double plus = perturbed(nets, shared, rank, p, eps, x, y);
                double minus = perturbed(nets, shared, rank, p, -eps, x, y);
                double numeric = (plus - minus) / (2 * eps);
                double err = Math.abs(numeric - g);
                assertTrue(err <= 1e-5 * Math.max(1.0, Math.abs(g)) || err < 1e-8,
                        "param " + p + " of rank " + rank + ": analytic " + g + ", numeric " + numeric);
                checked++;
            }
        }
        assertTrue(checked > 200, "checked " + checked + " parameters");
    }

    private static boolean inMoe(MultiLayerNetwork net, long p) {
        long offset = 0;
        for (Layer l : net.getLayers()) {
            if (p < offset + l.numParams()) {
                return l instanceof MoELayerImpl;
            }
            offset += l.numParams();
        }
        return false;
    }

    private static double perturbed(MultiLayerNetwork[] nets, boolean shared, int rank, long p, double d, INDArray x,
                                    INDArray y) {
        for (int r = 0; r < R; r++) {
            if (shared || r == rank) {
                nets[r].params().putScalar(p, nets[r].params().getDouble(p) + d);
            }
        }
        double v = totalObjective(nets, x, y);
        for (int r = 0; r < R; r++) {
            if (shared || r == rank) {
                nets[r].params().putScalar(p, nets[r].params().getDouble(p) - d);
            }
        }
        return v;
    }
}

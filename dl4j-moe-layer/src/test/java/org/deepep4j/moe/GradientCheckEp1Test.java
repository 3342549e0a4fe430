package org.deepep4j.moe;

import org.deeplearning4j.gradientcheck.GradientCheckUtil;
import org.deeplearning4j.nn.conf.ComputationGraphConfiguration;
import org.deeplearning4j.nn.conf.NeuralNetConfiguration;
import org.deeplearning4j.nn.conf.inputs.InputType;
import org.deeplearning4j.nn.conf.layers.OutputLayer;
import org.deeplearning4j.nn.graph.ComputationGraph;
import org.deeplearning4j.nn.multilayer.MultiLayerNetwork;
import org.deeplearning4j.nn.weights.WeightInit;
import org.junit.jupiter.api.BeforeAll;
import org.junit.jupiter.api.Test;
import org.nd4j.linalg.factory.Nd4j;
import org.nd4j.linalg.activations.Activation;
import org.nd4j.linalg.api.buffer.DataType;
import org.nd4j.linalg.api.ndarray.INDArray;
import org.nd4j.linalg.learning.config.NoOp;
import org.nd4j.linalg.lossfunctions.LossFunctions;

import static org.junit.jupiter.api.Assertions.assertTrue;

/** DL4J's numerical gradient checks (double precision) of the MoE layer with one rank. */
class GradientCheckEp1Test {

    @BeforeAll
    static void doublePrecision() {
        Nd4j.setDefaultDataTypes(DataType.DOUBLE, DataType.DOUBLE);
    }

    private static boolean check(MultiLayerNetwork net, INDArray x, INDArray y) {
        return GradientCheckUtil.checkGradients(new GradientCheckUtil.MLNConfig().net(net).input(x).labels(y)
                .epsilon(1e-6).maxRelError(1e-4).minAbsoluteError(1e-9));
    }

    @Test
    void feedForwardSoftmaxWithAuxLossAndSharedExpert() {
        MultiLayerNetwork net = new MultiLayerNetwork(Nets.ff(DataType.DOUBLE, new NoOp(),
                Nets.moe().auxLossCoefficient(0.05).sharedExpertFfnSize(3)));
        net.init();
        assertTrue(check(net, Nets.input(DataType.DOUBLE, 1, 10, Nets.N_IN), Nets.labels(DataType.DOUBLE, 2, 10)));
    }

    @Test
    void feedForwardTopOneWithoutRenormalisation() {
        MultiLayerNetwork net = new MultiLayerNetwork(Nets.ff(DataType.DOUBLE, new NoOp(),
                Nets.moe().topK(1).normalizeTopK(false).asyncCombine(true)));
        net.init();
        assertTrue(check(net, Nets.input(DataType.DOUBLE, 3, 9, Nets.N_IN), Nets.labels(DataType.DOUBLE, 4, 9)));
    }

    @Test
    void recurrentSigmoidAsync() {
        int t = 4;
        MultiLayerNetwork net = new MultiLayerNetwork(Nets.rnn(DataType.DOUBLE, new NoOp(),
                Nets.sigmoidMoe().asyncCombine(true).sharedExpertFfnSize(2), t));
        net.init();
        assertTrue(check(net, Nets.input(DataType.DOUBLE, 5, 3, Nets.N_IN, t), Nets.rnnLabels(DataType.DOUBLE, 6, 3, t)));
    }

    @Test
    void computationGraph() {
        ComputationGraphConfiguration conf = new NeuralNetConfiguration.Builder().seed(3).dataType(DataType.DOUBLE)
                .updater(new NoOp()).weightInit(WeightInit.XAVIER).graphBuilder()
                .addInputs("in")
                .addLayer("moe", Nets.moe().scoreFunction(org.deepep4j.moe.conf.ScoreFunction.SIGMOID).build(), "in")
                .addLayer("out", new OutputLayer.Builder(LossFunctions.LossFunction.MCXENT).nOut(Nets.N_CLASSES)
                        .activation(Activation.SOFTMAX).build(), "moe")
                .setOutputs("out").setInputTypes(InputType.feedForward(Nets.N_IN)).build();
        ComputationGraph g = new ComputationGraph(conf);
        g.init();
        assertTrue(GradientCheckUtil.checkGradients(new GradientCheckUtil.GraphConfig().net(g)
                .inputs(new INDArray[]{Nets.input(DataType.DOUBLE, 8, 7, Nets.N_IN)})
                .labels(new INDArray[]{Nets.labels(DataType.DOUBLE, 9, 7)})
                .epsilon(1e-6).maxRelError(1e-4).minAbsoluteError(1e-9)));
    }
}

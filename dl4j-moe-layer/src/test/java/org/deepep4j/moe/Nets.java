package org.deepep4j.moe;

import org.deepep4j.moe.conf.MoELayer;
import org.deepep4j.moe.conf.ScoreFunction;
import org.deeplearning4j.nn.conf.ComputationGraphConfiguration;
import org.deeplearning4j.nn.conf.MultiLayerConfiguration;
import org.deeplearning4j.nn.conf.NeuralNetConfiguration;
import org.deeplearning4j.nn.conf.graph.ElementWiseVertex;
import org.deeplearning4j.nn.conf.graph.MergeVertex;
import org.deeplearning4j.nn.conf.inputs.InputType;
import org.deeplearning4j.nn.conf.layers.DenseLayer;
import org.deeplearning4j.nn.conf.layers.OutputLayer;
import org.deeplearning4j.nn.conf.layers.RnnOutputLayer;
import org.deeplearning4j.nn.weights.WeightInit;
import org.nd4j.linalg.activations.Activation;
import org.nd4j.linalg.api.buffer.DataType;
import org.nd4j.linalg.api.ndarray.INDArray;
import org.nd4j.linalg.factory.Nd4j;
import org.nd4j.linalg.learning.config.IUpdater;
import org.nd4j.linalg.lossfunctions.LossFunctions;

/** Small networks shared by the tests. */
final class Nets {

    static final int N_IN = 6;
    static final int N_CLASSES = 3;

    private Nets() {
    }

    static MoELayer.Builder moe() {
        return new MoELayer.Builder().numExperts(4).topK(2).ffnSize(5);
    }

    /** dense(tanh) -> MoE -> softmax output, feed-forward input [mb, 6]. */
    static MultiLayerConfiguration ff(DataType type, IUpdater updater, MoELayer.Builder moe) {
        return ff(type, updater, moe, N_IN);
    }

    static MultiLayerConfiguration ff(DataType type, IUpdater updater, MoELayer.Builder moe, int nIn) {
        return new NeuralNetConfiguration.Builder().seed(42).dataType(type).updater(updater)
                .weightInit(WeightInit.XAVIER).list()
                .layer(new DenseLayer.Builder().nOut(nIn).activation(Activation.TANH).build())
                .layer(moe.build())
                .layer(new OutputLayer.Builder(LossFunctions.LossFunction.MCXENT).nOut(N_CLASSES)
                        .activation(Activation.SOFTMAX).build())
                .setInputType(InputType.feedForward(nIn)).build();
    }

    /**
     * The {@link #ff} layers as a ComputationGraph whose MoE layer vertex has a residual edge around it:
     * in -> dense(tanh) -> moe -> add(dense, moe) -> softmax output. The vertices are declared output first: DL4J
     * flattens a graph's parameters in topological order, not in the order of declaration or of getLayers().
     */
    static ComputationGraphConfiguration graph(DataType type, IUpdater updater, MoELayer.Builder moe, int nIn) {
        return new NeuralNetConfiguration.Builder().seed(42).dataType(type).updater(updater)
                .weightInit(WeightInit.XAVIER).graphBuilder()
                .addInputs("in")
                .addLayer("out", new OutputLayer.Builder(LossFunctions.LossFunction.MCXENT).nOut(N_CLASSES)
                        .activation(Activation.SOFTMAX).build(), "residual")
                .addVertex("residual", new ElementWiseVertex(ElementWiseVertex.Op.Add), "dense", "moe")
                .addLayer("moe", moe.build(), "dense")
                .addLayer("dense", new DenseLayer.Builder().nOut(nIn).activation(Activation.TANH).build(), "in")
                .setOutputs("out")
                .setInputTypes(InputType.feedForward(nIn)).build();
    }

    /** Two inputs "a" and "b" of nIn / 2 features each, merged -> MoE -> softmax output "out". */
    static ComputationGraphConfiguration twoInputGraph(DataType type, IUpdater updater, MoELayer.Builder moe, int nIn) {
        return new NeuralNetConfiguration.Builder().seed(42).dataType(type).updater(updater)
                .weightInit(WeightInit.XAVIER).graphBuilder()
                .addInputs("a", "b")
                .addVertex("ab", new MergeVertex(), "a", "b")
                .addLayer("moe", moe.build(), "ab")
                .addLayer("out", new OutputLayer.Builder(LossFunctions.LossFunction.MCXENT).nOut(N_CLASSES)
                        .activation(Activation.SOFTMAX).build(), "moe")
                .setOutputs("out")
                .setInputTypes(InputType.feedForward(nIn / 2), InputType.feedForward(nIn / 2)).build();
    }

    /** MoE directly on recurrent input [mb, 6, T] -> RNN softmax output. */
    static MultiLayerConfiguration rnn(DataType type, IUpdater updater, MoELayer.Builder moe, int t) {
        return rnn(type, updater, moe, t, N_IN);
    }

    /** As {@link #rnn(DataType, IUpdater, MoELayer.Builder, int)} with nIn features per step. */
    static MultiLayerConfiguration rnn(DataType type, IUpdater updater, MoELayer.Builder moe, int t, int nIn) {
        return new NeuralNetConfiguration.Builder().seed(7).dataType(type).updater(updater)
                .weightInit(WeightInit.XAVIER).list()
                .layer(moe.build())
                .layer(new RnnOutputLayer.Builder(LossFunctions.LossFunction.MCXENT).nOut(N_CLASSES)
                        .activation(Activation.SOFTMAX).build())
                .setInputType(InputType.recurrent(nIn, t)).build();
    }

    static INDArray input(DataType type, long seed, long... shape) {
        Nd4j.getRandom().setSeed(seed);
        return Nd4j.rand(type, shape).subi(0.5).muli(2.0);
    }

    static INDArray labels(DataType type, long seed, int mb) {
        INDArray l = Nd4j.zeros(type, mb, N_CLASSES);
        java.util.Random r = new java.util.Random(seed);
        for (int i = 0; i < mb; i++) {
            l.putScalar(i, r.nextInt(N_CLASSES), 1.0);
        }
        return l;
    }

    static INDArray rnnLabels(DataType type, long seed, int mb, int t) {
        INDArray l = Nd4j.zeros(type, mb, N_CLASSES, t);
        java.util.Random r = new java.util.Random(seed);
        for (int i = 0; i < mb; i++) {
            for (int j = 0; j < t; j++) {
                l.putScalar(new int[]{i, r.nextInt(N_CLASSES), j}, 1.0);
            }
        }
        return l;
    }

    static MoELayer.Builder sigmoidMoe() {
        return moe().scoreFunction(ScoreFunction.SIGMOID).normalizeTopK(false);
    }
}

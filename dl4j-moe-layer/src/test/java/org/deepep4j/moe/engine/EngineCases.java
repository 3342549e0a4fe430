package org.deepep4j.moe.engine;

import org.deepep4j.EpConfig;
import org.deepep4j.EpDevice;
import org.deepep4j.EpGroup;
import org.deepep4j.moe.conf.MoELayer;
import org.deepep4j.moe.layers.MoELayerImpl;
import org.deepep4j.moe.train.ExpertParallelTrainer;
import org.deeplearning4j.gradientcheck.GradientCheckUtil;
import org.deeplearning4j.datasets.iterator.utilty.ListDataSetIterator;
import org.deeplearning4j.nn.conf.MultiLayerConfiguration;
import org.deeplearning4j.nn.conf.NeuralNetConfiguration;
import org.deeplearning4j.nn.conf.inputs.InputType;
import org.deeplearning4j.nn.conf.layers.DenseLayer;
import org.deeplearning4j.nn.conf.layers.OutputLayer;
import org.deeplearning4j.nn.multilayer.MultiLayerNetwork;
import org.deeplearning4j.nn.weights.WeightInit;
import org.deeplearning4j.optimize.api.BaseTrainingListener;
import org.deeplearning4j.optimize.api.TrainingListener;
import org.nd4j.linalg.activations.Activation;
import org.nd4j.linalg.api.buffer.DataType;
import org.nd4j.linalg.api.ndarray.INDArray;
import org.nd4j.linalg.dataset.DataSet;
import org.nd4j.linalg.factory.Nd4j;
import org.nd4j.linalg.learning.config.IUpdater;
import org.nd4j.linalg.learning.config.NoOp;
import org.nd4j.linalg.lossfunctions.LossFunctions;

import java.util.ArrayList;
import java.util.Collections;
import java.util.List;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

/**
 * What the engine-block tests share (CPU device in CI, CUDA on the GPU machine): a small network, data, training on
 * either path with the losses of every step, and the comparison of two runs.
 */
public final class EngineCases {

    /** Token width: a multiple of 4 so an fp32 row is a multiple of 16 bytes (the engine's payload rule). */
    public static final int H = 8;
    public static final int CLASSES = 3;

    private EngineCases() {
    }

    public static MoELayer.Builder moe() {
        return new MoELayer.Builder().numExperts(4).topK(2).ffnSize(6).auxLossCoefficient(0.01);
    }

    /** dense(tanh) -> MoE -> softmax output; input [mb, H]. */
    public static MultiLayerConfiguration net(DataType type, IUpdater updater, MoELayer.Builder moe) {
        return new NeuralNetConfiguration.Builder().seed(42).dataType(type).updater(updater)
                .weightInit(WeightInit.XAVIER).list()
                .layer(new DenseLayer.Builder().nOut(H).activation(Activation.TANH).build())
                .layer(moe.build())
                .layer(new OutputLayer.Builder(LossFunctions.LossFunction.MCXENT).nOut(CLASSES)
                        .activation(Activation.SOFTMAX).build())
                .setInputType(InputType.feedForward(H)).build();
    }

    /**
     * DL4J's gradient check of {@link #net} with {@code moe}, in double precision, on 10 examples of {@code seed}
     * (the default data types are double meanwhile and float again after).
     */
    public static boolean gradientsCheckInDouble(MoELayer.Builder moe, long seed) {
        Nd4j.setDefaultDataTypes(DataType.DOUBLE, DataType.DOUBLE);
        try {
            MultiLayerNetwork net = new MultiLayerNetwork(net(DataType.DOUBLE, new NoOp(), moe));
            net.init();
            DataSet d = DataSet.merge(data(DataType.DOUBLE, 10, seed));
            return GradientCheckUtil.checkGradients(new GradientCheckUtil.MLNConfig().net(net).input(d.getFeatures())
                    .labels(d.getLabels()).epsilon(1e-6).maxRelError(1e-4).minAbsoluteError(1e-9));
        } finally {
            Nd4j.setDefaultDataTypes(DataType.FLOAT, DataType.FLOAT);
        }
    }

    public static List<DataSet> data(DataType type, int examples, long seed) {
        Nd4j.getRandom().setSeed(seed);
        INDArray x = Nd4j.rand(type, examples, H).subi(0.5).muli(2.0);
        INDArray y = Nd4j.zeros(type, examples, CLASSES);
        java.util.Random r = new java.util.Random(seed + 1);
        for (int i = 0; i < examples; i++) {
            y.putScalar(i, r.nextInt(CLASSES), 1.0);
        }
        return new DataSet(x, y).asList();
    }

    /** A network trained on one rank, {@code steps} minibatches of {@code batch}; the score of each step in {@code losses}. */
    public static MultiLayerNetwork fitEp1(MultiLayerConfiguration conf, List<DataSet> data, int batch, int steps,
                                           List<Double> losses) {
        MultiLayerNetwork net = new MultiLayerNetwork(conf);
        net.init();
        net.setListeners(scores(losses));
        List<DataSet> batches = batches(data, batch);
        for (int s = 0; s < steps; s++) {
            net.fit(batches.get(s % batches.size()));
        }
        return net;
    }

    /** The whole network after {@code epochs} over {@code data} with {@code ranks} in-process ranks on {@code device}. */
    public static MultiLayerNetwork fitEp(int ranks, EpDevice device, MultiLayerConfiguration conf, List<DataSet> data,
                                          int batch, int epochs, List<Double> rank0Losses) {
        try (EpGroup group = EpGroup.inProcess(ranks)) {
            ExpertParallelTrainer t = ExpertParallelTrainer.builder()
                    .group(group, EpConfig.builder().device(device).bufferSizeGb(0.01).build())
                    .network(conf).iterator(new ListDataSetIterator<>(data, batch)).epochs(epochs)
                    .listeners(scores(rank0Losses)).build();
            t.fit();
            return t.wholeNetwork();
        }
    }

    private static List<DataSet> batches(List<DataSet> data, int batch) {
        List<DataSet> out = new ArrayList<>();
        for (int i = 0; i + batch <= data.size(); i += batch) {
            out.add(DataSet.merge(data.subList(i, i + batch)));
        }
        return out;
    }

    private static TrainingListener scores(List<Double> losses) {
        List<Double> sink = losses == null ? new ArrayList<>() : losses;
        return new BaseTrainingListener() {
            @Override
            public void iterationDone(org.deeplearning4j.nn.api.Model model, int iteration, int epoch) {
                sink.add(model.score());
            }
        };
    }

    /** Asserts equal step losses and parameters within {@code tol} (relative to 1 + |value|). */
    public static void assertSameTraining(List<Double> lossA, MultiLayerNetwork a, List<Double> lossB,
                                          MultiLayerNetwork b, double tol) {
        assertEquals(lossA.size(), lossB.size(), "steps");
        assertTrue(lossA.size() >= 10, "steps = " + lossA.size());
        for (int i = 0; i < lossA.size(); i++) {
            double d = Math.abs(lossA.get(i) - lossB.get(i));
            assertTrue(d <= tol * (1 + Math.abs(lossA.get(i))), "step " + i + ": loss " + lossA.get(i) + " vs " + lossB.get(i));
        }
        INDArray pa = a.params().castTo(DataType.DOUBLE);
        INDArray pb = b.params().castTo(DataType.DOUBLE);
        double worst = pa.sub(pb).amaxNumber().doubleValue();
        assertTrue(worst <= tol * (1 + pa.amaxNumber().doubleValue()), "parameters differ by up to " + worst);
        assertTrue(Math.abs(lossA.get(0) - lossA.get(lossA.size() - 1)) > 1e-4, "training changed the loss: " + lossA);
    }

    public static MoELayerImpl moeLayer(MultiLayerNetwork net) {
        return (MoELayerImpl) net.getLayer(1);
    }

    public static List<Double> list() {
        return Collections.synchronizedList(new ArrayList<>());
    }
}

package org.deepep4j.moe;

import org.deepep4j.EpConfig;
import org.deepep4j.EpGroup;
import org.deepep4j.moe.conf.MoELayer;
import org.deepep4j.moe.train.ExpertParallelTrainer;
import org.deeplearning4j.datasets.iterator.utilty.ListDataSetIterator;
import org.deeplearning4j.nn.conf.ComputationGraphConfiguration;
import org.deeplearning4j.nn.conf.MultiLayerConfiguration;
import org.deeplearning4j.nn.conf.NeuralNetConfiguration;
import org.deeplearning4j.nn.conf.graph.ElementWiseVertex;
import org.deeplearning4j.nn.conf.inputs.InputType;
import org.deeplearning4j.nn.conf.layers.DenseLayer;
import org.deeplearning4j.nn.conf.layers.OutputLayer;
import org.deeplearning4j.nn.graph.ComputationGraph;
import org.deeplearning4j.nn.multilayer.MultiLayerNetwork;
import org.deeplearning4j.optimize.listeners.ScoreIterationListener;
import org.junit.jupiter.api.Test;
import org.nd4j.linalg.activations.Activation;
import org.nd4j.linalg.api.buffer.DataType;
import org.nd4j.linalg.dataset.DataSet;
import org.nd4j.linalg.learning.config.Adam;
import org.nd4j.linalg.lossfunctions.LossFunctions;

import static org.junit.jupiter.api.Assertions.assertTrue;

/** The README's DL4J examples, kept compiling and running. */
class ReadmeExampleTest {

    @Test
    void readmeExample() {
        DataSet data = new DataSet(Nets.input(DataType.FLOAT, 1, 256, 16), Nets.labels(DataType.FLOAT, 2, 256));
        // --- README begin
        MultiLayerConfiguration conf = new NeuralNetConfiguration.Builder().seed(1).updater(new Adam(1e-3)).list()
                .layer(new DenseLayer.Builder().nOut(64).activation(Activation.RELU).build())
                .layer(new MoELayer.Builder().numExperts(8).topK(2).ffnSize(128).auxLossCoefficient(0.01).build())
                .layer(new OutputLayer.Builder(LossFunctions.LossFunction.MCXENT).nOut(3)
                        .activation(Activation.SOFTMAX).build())
                .setInputType(InputType.feedForward(16)).build();
        try (EpGroup group = EpGroup.inProcess(2)) {            // 2 ranks = 2 threads, experts 0-3 and 4-7
            ExpertParallelTrainer trainer = ExpertParallelTrainer.builder()
                    .group(group, EpConfig.builder().bufferSizeGb(0.25).build())
                    .network(conf)                              // the whole model; each rank gets its shard
                    .iterator(new ListDataSetIterator<>(data.asList(), 32))   // batches dealt round-robin to ranks
                    .epochs(3)
                    .listeners(new ScoreIterationListener(4))
                    .build();
            trainer.fit();
            MultiLayerNetwork model = trainer.wholeNetwork();   // all experts again, for eval or ModelSerializer
            // --- README end
            assertTrue(model.score(data) < 1.2, "loss " + model.score(data));
        }
    }

    @Test
    void readmeGraphExample() {
        DataSet data = new DataSet(Nets.input(DataType.FLOAT, 1, 256, 16), Nets.labels(DataType.FLOAT, 2, 256));
        // --- README begin
        ComputationGraphConfiguration graph = new NeuralNetConfiguration.Builder().seed(1).updater(new Adam(1e-3))
                .graphBuilder().addInputs("in")
                .addLayer("dense", new DenseLayer.Builder().nOut(64).activation(Activation.RELU).build(), "in")
                .addLayer("moe", new MoELayer.Builder().numExperts(8).topK(2).ffnSize(128).build(), "dense")
                .addVertex("residual", new ElementWiseVertex(ElementWiseVertex.Op.Add), "dense", "moe")
                .addLayer("out", new OutputLayer.Builder(LossFunctions.LossFunction.MCXENT).nOut(3)
                        .activation(Activation.SOFTMAX).build(), "residual")
                .setOutputs("out").setInputTypes(InputType.feedForward(16)).build();
        ExpertParallelTrainer trainer = ExpertParallelTrainer.builder().ranks(2)
                .network(graph).iterator(new ListDataSetIterator<>(data.asList(), 32)).epochs(3).build();
        trainer.fit();
        ComputationGraph model = trainer.wholeGraph();
        // --- README end
        assertTrue(model.score(data) < 1.2, "loss " + model.score(data));
    }
}

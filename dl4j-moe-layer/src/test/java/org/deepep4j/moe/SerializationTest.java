package org.deepep4j.moe;

import org.deepep4j.moe.conf.MoELayer;
import org.deepep4j.moe.conf.ScoreFunction;
import org.deeplearning4j.nn.conf.ComputationGraphConfiguration;
import org.deeplearning4j.nn.conf.MultiLayerConfiguration;
import org.deeplearning4j.nn.conf.NeuralNetConfiguration;
import org.deeplearning4j.nn.conf.inputs.InputType;
import org.deeplearning4j.nn.conf.layers.OutputLayer;
import org.deeplearning4j.nn.graph.ComputationGraph;
import org.deeplearning4j.nn.multilayer.MultiLayerNetwork;
import org.deeplearning4j.util.ModelSerializer;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;
import org.nd4j.linalg.activations.Activation;
import org.nd4j.linalg.api.buffer.DataType;
import org.nd4j.linalg.api.ndarray.INDArray;
import org.nd4j.linalg.learning.config.Adam;
import org.nd4j.linalg.lossfunctions.LossFunctions;

import java.io.File;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertNotEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

/** JSON and ModelSerializer round trips keep every MoE setting, the parameters and the outputs. */
class SerializationTest {

    private static MoELayer.Builder everySetting() {
        return Nets.moe().numExperts(6).topK(3).ffnSize(7).scoreFunction(ScoreFunction.SIGMOID).normalizeTopK(false)
                .auxLossCoefficient(0.02).biasUpdateRate(1e-3).sharedExpertFfnSize(4).asyncCombine(true);
    }

    @Test
    void multiLayerJsonRoundTrip() {
        MultiLayerConfiguration conf = Nets.ff(DataType.FLOAT, new Adam(1e-3), everySetting());
        String json = conf.toJson();
        assertTrue(json.contains("\"numExperts\" : 6"), json);
        MultiLayerConfiguration back = MultiLayerConfiguration.fromJson(json);
        assertEquals(conf, back);
        MoELayer m = (MoELayer) back.getConf(1).getLayer();
        assertEquals(ScoreFunction.SIGMOID, m.getScoreFunction());
        assertEquals(3, m.getTopK());
        assertEquals(1e-3, m.getBiasUpdateRate());
        assertTrue(m.isAsyncCombine());
        assertEquals(Nets.N_IN, m.getNIn());
        MoELayer other = (MoELayer) Nets.ff(DataType.FLOAT, new Adam(1e-3), everySetting().topK(2)).getConf(1).getLayer();
        assertNotEquals(m, other);
    }

    @Test
    void computationGraphJsonRoundTrip() {
        ComputationGraphConfiguration conf = new NeuralNetConfiguration.Builder().seed(1).graphBuilder().addInputs("in")
                .addLayer("moe", everySetting().build(), "in")
                .addLayer("out", new OutputLayer.Builder(LossFunctions.LossFunction.MCXENT).nOut(3)
                        .activation(Activation.SOFTMAX).build(), "moe")
                .setOutputs("out").setInputTypes(InputType.recurrent(Nets.N_IN)).build();
        assertEquals(conf, ComputationGraphConfiguration.fromJson(conf.toJson()));
        assertEquals(conf, ComputationGraphConfiguration.fromYaml(conf.toYaml()));
    }

    @Test
    void modelSerializerRoundTrip(@TempDir File dir) throws Exception {
        MultiLayerNetwork net = new MultiLayerNetwork(Nets.ff(DataType.FLOAT, new Adam(1e-2), everySetting()));
        net.init();
        net.fit(Nets.input(DataType.FLOAT, 1, 16, Nets.N_IN), Nets.labels(DataType.FLOAT, 2, 16));
        File f = new File(dir, "moe.zip");
        ModelSerializer.writeModel(net, f, true);
        MultiLayerNetwork back = ModelSerializer.restoreMultiLayerNetwork(f, true);
        assertEquals(net.getLayerWiseConfigurations(), back.getLayerWiseConfigurations());
        assertEquals(net.params(), back.params());
        assertEquals(net.getUpdater().getStateViewArray(), back.getUpdater().getStateViewArray());
        INDArray x = Nets.input(DataType.FLOAT, 3, 5, Nets.N_IN);
        assertEquals(net.output(x), back.output(x));
        // training continues identically from the restored updater state
        net.fit(x, Nets.labels(DataType.FLOAT, 4, 5));
        back.fit(x, Nets.labels(DataType.FLOAT, 4, 5));
        assertEquals(net.params(), back.params());
    }

    @Test
    void computationGraphSerializerRoundTrip(@TempDir File dir) throws Exception {
        ComputationGraphConfiguration conf = new NeuralNetConfiguration.Builder().seed(1).updater(new Adam(1e-2))
                .graphBuilder().addInputs("in")
                .addLayer("moe", Nets.moe().build(), "in")
                .addLayer("out", new OutputLayer.Builder(LossFunctions.LossFunction.MCXENT).nOut(3)
                        .activation(Activation.SOFTMAX).build(), "moe")
                .setOutputs("out").setInputTypes(InputType.feedForward(Nets.N_IN)).build();
        ComputationGraph g = new ComputationGraph(conf);
        g.init();
        g.fit(new INDArray[]{Nets.input(DataType.FLOAT, 5, 8, Nets.N_IN)},
                new INDArray[]{Nets.labels(DataType.FLOAT, 6, 8)});
        File f = new File(dir, "moe-graph.zip");
        ModelSerializer.writeModel(g, f, true);
        ComputationGraph back = ModelSerializer.restoreComputationGraph(f, true);
        INDArray x = Nets.input(DataType.FLOAT, 7, 4, Nets.N_IN);
        assertEquals(g.params(), back.params());
        assertEquals(g.outputSingle(x), back.outputSingle(x));
    }
}

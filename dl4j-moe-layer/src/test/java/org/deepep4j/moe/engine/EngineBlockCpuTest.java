package org.deepep4j.moe.engine;

import org.deepep4j.EpDevice;
import org.deepep4j.moe.conf.ExpertResidency;
import org.deepep4j.moe.layers.EngineBlocks;
import org.deepep4j.moe.layers.MoELayerImpl;
import org.deeplearning4j.nn.conf.MultiLayerConfiguration;
import org.deeplearning4j.nn.multilayer.MultiLayerNetwork;
import org.deeplearning4j.util.ModelSerializer;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;
import org.nd4j.linalg.api.buffer.DataType;
import org.nd4j.linalg.api.ndarray.INDArray;
import org.nd4j.linalg.dataset.DataSet;
import org.nd4j.linalg.factory.Nd4j;
import org.nd4j.linalg.learning.config.AdaGrad;
import org.nd4j.linalg.learning.config.Adam;
import org.nd4j.linalg.learning.config.Sgd;
import org.nd4j.linalg.learning.regularization.WeightDecay;

import java.io.File;
import java.util.List;

import static org.deepep4j.moe.engine.EngineCases.*;
import static org.junit.jupiter.api.Assertions.*;

/** The engine-block path of MoELayer on the engine's CPU device, against the Java path. Runs in CI. */
class EngineBlockCpuTest {

    private static final double TOL = 2e-4;  // fp32: engine and ND4J sum in different orders

    @Test
    void ep1AdamTrainsLikeJavaPath() {
        List<DataSet> data = data(DataType.FLOAT, 64, 5);
        List<Double> javaLoss = list(), engineLoss = list();
        MultiLayerNetwork java = fitEp1(net(DataType.FLOAT, new Adam(1e-2), moe().sharedExpertFfnSize(4)), data, 16, 20, javaLoss);
        MultiLayerNetwork engine = fitEp1(net(DataType.FLOAT, new Adam(1e-2), moe().sharedExpertFfnSize(4)
                .engineBlock(true)), data, 16, 20, engineLoss);
        assertSameTraining(javaLoss, java, engineLoss, engine, TOL);
        assertEquals(20, moeLayer(engine).viewSynchronizations(), "views copied back once per step");
    }

    @Test
    void ep1SgdAndAdamWTrainLikeJavaPath() {
        List<DataSet> data = data(DataType.FLOAT, 48, 6);
        for (boolean adamW : new boolean[]{false, true}) {
            List<Double> a = list(), b = list();
            MultiLayerConfiguration javaConf = adamW ? withDecay(net(DataType.FLOAT, new Adam(1e-2), moe()))
                    : net(DataType.FLOAT, new Sgd(0.1), moe());
            MultiLayerConfiguration engineConf = adamW ? withDecay(net(DataType.FLOAT, new Adam(1e-2), moe().engineBlock(true)))
                    : net(DataType.FLOAT, new Sgd(0.1), moe().engineBlock(true));
            MultiLayerNetwork java = fitEp1(javaConf, data, 12, 20, a);
            MultiLayerNetwork engine = fitEp1(engineConf, data, 12, 20, b);
            assertSameTraining(a, java, b, engine, TOL);
        }
    }

    /** Adam + WeightDecay(applyLR) on every layer: AdamW for the engine's experts. */
    private static MultiLayerConfiguration withDecay(MultiLayerConfiguration c) {
        for (org.deeplearning4j.nn.conf.NeuralNetConfiguration l : c.getConfs()) {
            ((org.deeplearning4j.nn.conf.layers.BaseLayer) l.getLayer()).setRegularization(
                    java.util.Collections.singletonList(new WeightDecay(1e-2, true)));
        }
        return c;
    }

    @Test
    void ep2TrainerTrainsLikeJavaPath() {
        List<DataSet> data = data(DataType.FLOAT, 80, 7);
        List<Double> javaLoss = list();
        MultiLayerNetwork java = fitEp(2, EpDevice.CPU, net(DataType.FLOAT, new Adam(1e-2), moe().sharedExpertFfnSize(3)),
                data, 8, 4, javaLoss);
        for (boolean sync : new boolean[]{true, false}) {  // false: views synchronised once, by wholeNetwork()
            List<Double> engineLoss = list();
            MultiLayerNetwork engine = fitEp(2, EpDevice.CPU, net(DataType.FLOAT, new Adam(1e-2), moe().sharedExpertFfnSize(3)
                    .engineBlock(true).asyncCombine(true).syncViewsEveryStep(sync)), data, 8, 4, engineLoss);
            assertEquals(20, engineLoss.size());
            assertSameTraining(javaLoss, java, engineLoss, engine, TOL);
        }
    }

    /**
     * DL4J's own views after every step, read raw (the network's flattened parameters, as ModelSerializer and
     * listeners read them): with syncViewsEveryStep they match the Java path's step by step with no call at all, and
     * DL4J's expert gradient block is zero after the step (DL4J's step subtracted nothing from the engine's weights);
     * without it, after {@link EngineBlocks#synchronize}. A stale or doubly-updated view fails here at its step.
     */
    @Test
    void rawViewsMatchTheJavaPathAfterEveryStep() {
        List<DataSet> data = data(DataType.FLOAT, 64, 13);
        for (boolean sync : new boolean[]{true, false}) {
            MultiLayerNetwork java = new MultiLayerNetwork(net(DataType.FLOAT, new Adam(1e-2), moe()));
            java.init();
            MultiLayerNetwork engine = new MultiLayerNetwork(net(DataType.FLOAT, new Adam(1e-2), moe().engineBlock(true)
                    .syncViewsEveryStep(sync)));
            engine.init();
            MoELayerImpl layer = moeLayer(engine);
            long[] experts = expertRange(layer);
            for (int s = 0; s < 8; s++) {
                DataSet b = DataSet.merge(data.subList((s % 4) * 16, (s % 4) * 16 + 16));
                java.fit(b);
                engine.fit(b);
                if (!sync) {
                    EngineBlocks.synchronize(engine);
                }
                INDArray pa = java.params().castTo(DataType.DOUBLE), pb = engine.params().castTo(DataType.DOUBLE);
                double worst = pa.sub(pb).amaxNumber().doubleValue();
                assertTrue(worst <= TOL * (1 + pa.amaxNumber().doubleValue()), "sync=" + sync + " step " + s
                        + ": the network's raw parameters differ from the Java path's by " + worst);
                INDArray g = layer.getGradientsViewArray();
                INDArray ge = g.reshape(g.length()).get(org.nd4j.linalg.indexing.NDArrayIndex.interval(experts[0], experts[1]));
                assertEquals(0.0, ge.amaxNumber().doubleValue(), 0.0, "sync=" + sync + " step " + s
                        + ": DL4J's expert gradient block is not zero after the step");
            }
        }
    }

    /** [start, end) of the routed experts inside the layer's flattened parameters. */
    private static long[] expertRange(MoELayerImpl layer) {
        long at = 0, start = -1, end = -1;
        for (java.util.Map.Entry<String, long[]> e : org.deepep4j.moe.params.MoEParamInitializer.shapes(
                (org.deepep4j.moe.conf.MoELayer) layer.conf().getLayer()).entrySet()) {
            long n = e.getValue()[0] * e.getValue()[1];
            if (org.deepep4j.moe.params.MoEParamInitializer.isExpertParam(e.getKey())) {
                start = start < 0 ? at : start;
                end = at + n;
            }
            at += n;
        }
        return new long[]{start, end};
    }

    @Test
    void gradientCheckDoublePrecisionHostResidency() {
        assertTrue(gradientsCheckInDouble(moe().auxLossCoefficient(0.05).sharedExpertFfnSize(3).asyncCombine(true)
                .engineBlock(true).expertResidency(ExpertResidency.HOST), 8));
    }

    @Test
    void jsonKeepsEngineSettings() {
        MultiLayerConfiguration conf = net(DataType.FLOAT, new Adam(1e-3), moe().engineBlock(true).device(EpDevice.CUDA)
                .expertResidency(ExpertResidency.HOST).syncViewsEveryStep(false).engineMaxTokens(512));
        String json = conf.toJson();
        assertTrue(json.contains("\"engineBlock\" : true"), json);
        MultiLayerConfiguration back = MultiLayerConfiguration.fromJson(json);
        assertEquals(conf, back);
        org.deepep4j.moe.conf.MoELayer m = (org.deepep4j.moe.conf.MoELayer) back.getConf(1).getLayer();
        assertEquals(EpDevice.CUDA, m.getDevice());
        assertEquals(ExpertResidency.HOST, m.getExpertResidency());
        assertFalse(m.isSyncViewsEveryStep());
        assertEquals(512, m.getEngineMaxTokens());
    }

    @Test
    void modelSerializerRoundTripResumesLikeUninterrupted(@TempDir File dir) throws Exception {
        List<DataSet> data = data(DataType.FLOAT, 64, 9);
        MultiLayerConfiguration conf = net(DataType.FLOAT, new Adam(1e-2), moe().engineBlock(true));
        MultiLayerNetwork net = fitEp1(conf, data, 16, 6, null);
        File f = new File(dir, "moe.zip");
        ModelSerializer.writeModel(net, f, true);
        MultiLayerNetwork back = ModelSerializer.restoreMultiLayerNetwork(f, true);
        assertEquals(net.params(), back.params());
        INDArray x = data.get(0).getFeatures().reshape(1, H);
        assertTrue(net.output(x).equalsWithEps(back.output(x), 1e-6));
        // Adam's moments of the experts came back too: both continue identically.
        List<DataSet> more = data(DataType.FLOAT, 16, 10);
        net.fit(DataSet.merge(more));
        back.fit(DataSet.merge(more));
        double d = net.params().sub(back.params()).amaxNumber().doubleValue();
        assertTrue(d < 1e-6, "after one more step the restored model differs by " + d);
    }

    @Test
    void lazyViewsAreCopiedOnlyWhenReadThroughTheLayer() {
        List<DataSet> data = data(DataType.FLOAT, 64, 11);
        MultiLayerNetwork net = fitEp1(net(DataType.FLOAT, new Adam(1e-2), moe().engineBlock(true).syncViewsEveryStep(false)),
                data, 16, 5, null);
        MoELayerImpl layer = moeLayer(net);
        assertEquals(0, layer.viewSynchronizations(), "no copies during training");
        INDArray before = net.params().dup();     // the network's raw view: weights of the last synchronisation
        INDArray expert = layer.getParam("e0W1").dup();  // a read through the layer copies the engine's weights
        assertEquals(1, layer.viewSynchronizations());
        assertNotEquals(before, net.params(), "the read brought the views up to date");
        assertEquals(expert, layer.getParam("e0W1"));
        assertEquals(1, layer.viewSynchronizations(), "second read: already current");
        net.fit(DataSet.merge(data.subList(0, 16)));
        EngineBlocks.synchronize(net);
        assertEquals(2, layer.viewSynchronizations());
    }

    @Test
    void setParamsReachTheEngine() {
        List<DataSet> data = data(DataType.FLOAT, 32, 12);
        MultiLayerNetwork a = fitEp1(net(DataType.FLOAT, new Adam(1e-2), moe().engineBlock(true)), data, 16, 3, null);
        MultiLayerNetwork b = new MultiLayerNetwork(net(DataType.FLOAT, new Adam(1e-2), moe()));
        b.init();
        INDArray x = data.get(0).getFeatures().reshape(1, H);
        a.output(x);  // the engine block exists
        a.getLayer(1).setParams(b.getLayer(1).params());
        a.getLayer(0).setParams(b.getLayer(0).params());
        a.getLayer(2).setParams(b.getLayer(2).params());
        assertTrue(a.output(x).equalsWithEps(b.output(x), 1e-5), "the engine computes with the weights just set");
    }

    @Test
    void unsupportedUpdaterIsRefusedAtInit() {
        MultiLayerNetwork net = new MultiLayerNetwork(net(DataType.FLOAT, new AdaGrad(0.1), moe().engineBlock(true)));
        IllegalArgumentException e = assertThrows(IllegalArgumentException.class, net::init);
        assertTrue(e.getMessage().contains("updater=AdaGrad") && e.getMessage().contains("expertResidency(HOST)"), e.getMessage());
    }

    @Test
    void cudaWithoutEngineBlockIsRefused() {
        IllegalArgumentException e = assertThrows(IllegalArgumentException.class, () -> moe().device(EpDevice.CUDA).build());
        assertTrue(e.getMessage().contains("device=CUDA") && e.getMessage().contains("engineBlock(true)"), e.getMessage());
    }

    @Test
    void cudaWithoutGpuNamesWhatIsMissing() {
        org.junit.jupiter.api.Assumptions.assumeTrue(org.deepep4j.natives.DeepEp4jNative.deepep4j_cuda_device_count() == 0,
                "a CUDA device is visible: this test is about machines without one");
        MultiLayerNetwork net = new MultiLayerNetwork(net(DataType.FLOAT, new Adam(1e-2), moe().engineBlock(true).device(EpDevice.CUDA)));
        net.init();
        IllegalStateException e = assertThrows(IllegalStateException.class, () -> net.output(Nd4j.rand(DataType.FLOAT, 2, H)));
        assertTrue(e.getMessage().contains("no CUDA device") && e.getMessage().contains("no CPU fallback"), e.getMessage());
    }
}

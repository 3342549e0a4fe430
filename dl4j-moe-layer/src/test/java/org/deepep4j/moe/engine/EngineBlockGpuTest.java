package org.deepep4j.moe.engine;

import org.deepep4j.EpDevice;
import org.deepep4j.moe.conf.ExpertResidency;
import org.deepep4j.natives.DeepEp4jNative;
import org.deeplearning4j.nn.multilayer.MultiLayerNetwork;
import org.deeplearning4j.util.ModelSerializer;
import org.junit.jupiter.api.Assumptions;
import org.junit.jupiter.api.BeforeEach;
import org.junit.jupiter.api.Tag;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;
import org.nd4j.linalg.api.buffer.DataType;
import org.nd4j.linalg.dataset.DataSet;
import org.nd4j.linalg.learning.config.Adam;

import java.io.File;
import java.util.List;

import static org.deepep4j.moe.engine.EngineCases.*;
import static org.junit.jupiter.api.Assertions.*;

/**
 * The engine-block path on CUDA against the Java CPU path: same network, data and seed. Skipped, with the reason
 * printed, where the engine sees no GPU (CI); run on the GPU machine by examples/scripts/gpu-java.sh.
 */
@Tag("gpu")
class EngineBlockGpuTest {

    private static final double TOL = 1e-3;  // fp32 on cuBLAS vs ND4J's CPU GEMMs, 20 Adam steps

    @BeforeEach
    void needsGpu() {
        int n = DeepEp4jNative.deepep4j_cuda_device_count();
        String why = "skipped: deepep4j_cuda_device_count() = 0 (no GPU, or libdeepep4j.so built without CUDA)";
        if (n == 0) {
            System.out.println("EngineBlockGpuTest " + why);
        }
        Assumptions.assumeTrue(n > 0, why);
    }

    @Test
    void ep1OnGpuTrainsLikeJavaCpuPath() {
        List<DataSet> data = data(DataType.FLOAT, 64, 21);
        List<Double> a = list(), b = list();
        MultiLayerNetwork java = fitEp1(net(DataType.FLOAT, new Adam(1e-2), moe().sharedExpertFfnSize(4)), data, 16, 20, a);
        MultiLayerNetwork gpu = fitEp1(net(DataType.FLOAT, new Adam(1e-2), moe().sharedExpertFfnSize(4).asyncCombine(true)
                .engineBlock(true).device(EpDevice.CUDA)), data, 16, 20, b);
        assertSameTraining(a, java, b, gpu, TOL);
    }

    @Test
    void ep2SharingOneGpuTrainsLikeJavaCpuPath() {
        List<DataSet> data = data(DataType.FLOAT, 80, 22);
        List<Double> a = list(), b = list();
        MultiLayerNetwork java = fitEp(2, EpDevice.CPU, net(DataType.FLOAT, new Adam(1e-2), moe()), data, 8, 4, a);
        MultiLayerNetwork gpu = fitEp(2, EpDevice.CUDA, net(DataType.FLOAT, new Adam(1e-2), moe().engineBlock(true)),
                data, 8, 4, b);
        assertSameTraining(a, java, b, gpu, TOL);
    }

    @Test
    void gradientCheckDoublePrecisionOnGpu() {
        assertTrue(gradientsCheckInDouble(moe().sharedExpertFfnSize(3).engineBlock(true).device(EpDevice.CUDA)
                .expertResidency(ExpertResidency.HOST), 23));
    }

    @Test
    void gpuTrainedModelRoundTripsThroughModelSerializer(@TempDir File dir) throws Exception {
        List<DataSet> data = data(DataType.FLOAT, 64, 24);
        MultiLayerNetwork net = fitEp1(net(DataType.FLOAT, new Adam(1e-2), moe().engineBlock(true).device(EpDevice.CUDA)),
                data, 16, 6, null);
        File f = new File(dir, "gpu.zip");
        ModelSerializer.writeModel(net, f, true);
        MultiLayerNetwork back = ModelSerializer.restoreMultiLayerNetwork(f, true);
        assertEquals(net.params(), back.params());
        assertEquals(net.getLayerWiseConfigurations(), back.getLayerWiseConfigurations());
        assertTrue(net.output(data.get(0).getFeatures().reshape(1, H))
                .equalsWithEps(back.output(data.get(0).getFeatures().reshape(1, H)), 1e-5));
    }
}

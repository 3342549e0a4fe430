package org.deepep4j.moe.train;

import org.deepep4j.moe.conf.MoELayer;
import org.deepep4j.moe.layers.MoELayerImpl;
import org.deepep4j.moe.params.MoEParamInitializer;
import org.deeplearning4j.nn.conf.MultiLayerConfiguration;
import org.deeplearning4j.nn.conf.NeuralNetConfiguration;
import org.deeplearning4j.nn.multilayer.MultiLayerNetwork;
import org.nd4j.linalg.api.ndarray.INDArray;

import java.util.Map;

/** Moves parameters between a whole model (every expert, epSize 1) and the replicas of R ranks. */
public final class ExpertSharding {

    private ExpertSharding() {
    }

    /** A copy of {@code conf} whose MoE layers split their experts over {@code ranks}. */
    public static MultiLayerConfiguration withEpSize(MultiLayerConfiguration conf, int ranks) {
        MultiLayerConfiguration c = conf.clone();
        for (NeuralNetConfiguration layerConf : c.getConfs()) {
            if (layerConf.getLayer() instanceof MoELayer) {
                MoELayer m = (MoELayer) layerConf.getLayer();
                m.setEpSize(ranks);
                m.validate();
            }
        }
        return c;
    }

    /** Copies replicated parameters and rank {@code rank}'s experts from {@code whole} into {@code replica}. */
    public static void scatter(MultiLayerNetwork whole, MultiLayerNetwork replica, int rank) {
        transfer(whole, replica, rank, true);
    }

    /** Copies rank {@code rank}'s experts (and, for rank 0, the replicated parameters) into {@code whole}. */
    public static void gather(MultiLayerNetwork replica, MultiLayerNetwork whole, int rank) {
        transfer(whole, replica, rank, false);
    }

    private static void transfer(MultiLayerNetwork whole, MultiLayerNetwork replica, int rank, boolean toReplica) {
        if (whole.getnLayers() != replica.getnLayers()) {
            throw new IllegalArgumentException("replica layers=" + replica.getnLayers() + ": must equal the whole model's "
                    + whole.getnLayers());
        }
        for (int i = 0; i < whole.getnLayers(); i++) {
            int local = 0;
            if (replica.getLayer(i) instanceof MoELayerImpl) {
                local = ((MoELayer) replica.getLayer(i).conf().getLayer()).getNumLocalExperts();
            }
            for (Map.Entry<String, INDArray> p : replica.getLayer(i).paramTable().entrySet()) {
                String key = p.getKey();
                boolean expert = replica.getLayer(i) instanceof MoELayerImpl && MoEParamInitializer.isExpertParam(key);
                if (!expert && !toReplica && rank != 0) {
                    continue;
                }
                String wholeKey = expert
                        ? MoEParamInitializer.withExpertIndex(key, rank * local + MoEParamInitializer.expertIndex(key))
                        : key;
                INDArray w = whole.getLayer(i).getParam(wholeKey);
                if (toReplica) {
                    p.getValue().assign(w);
                } else {
                    w.assign(p.getValue());
                }
            }
        }
    }
}

package org.deepep4j.moe.train;

import org.deepep4j.moe.conf.MoELayer;
import org.deepep4j.moe.layers.MoELayerImpl;
import org.deepep4j.moe.params.MoEParamInitializer;
import org.deeplearning4j.nn.api.Layer;
import org.deeplearning4j.nn.api.Model;
import org.deeplearning4j.nn.conf.ComputationGraphConfiguration;
import org.deeplearning4j.nn.conf.MultiLayerConfiguration;
import org.deeplearning4j.nn.conf.NeuralNetConfiguration;
import org.deeplearning4j.nn.conf.graph.GraphVertex;
import org.deeplearning4j.nn.conf.graph.LayerVertex;
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
            setEpSize(layerConf.getLayer(), ranks);
        }
        return c;
    }

    /** A copy of {@code conf} whose MoE layer vertices split their experts over {@code ranks}. */
    public static ComputationGraphConfiguration withEpSize(ComputationGraphConfiguration conf, int ranks) {
        ComputationGraphConfiguration c = conf.clone();
        for (GraphVertex v : c.getVertices().values()) {
            if (v instanceof LayerVertex) {
                setEpSize(((LayerVertex) v).getLayerConf().getLayer(), ranks);
            }
        }
        return c;
    }

    private static void setEpSize(org.deeplearning4j.nn.conf.layers.Layer layer, int ranks) {
        if (layer instanceof MoELayer) {
            MoELayer m = (MoELayer) layer;
            m.setEpSize(ranks);
            m.validate();
        }
    }

    /**
     * Copies replicated parameters and rank {@code rank}'s experts from {@code whole} into {@code replica}: two
     * MultiLayerNetworks or two ComputationGraphs of one configuration (up to epSize).
     */
    public static void scatter(Model whole, Model replica, int rank) {
        transfer(NetworkAdapter.of(whole), NetworkAdapter.of(replica), rank, true);
    }

    /** Copies rank {@code rank}'s experts (and, for rank 0, the replicated parameters) into {@code whole}. */
    public static void gather(Model replica, Model whole, int rank) {
        transfer(NetworkAdapter.of(whole), NetworkAdapter.of(replica), rank, false);
    }

    private static void transfer(NetworkAdapter wholeNet, NetworkAdapter replicaNet, int rank, boolean toReplica) {
        Layer[] whole = wholeNet.layersInParamOrder();
        Layer[] replica = replicaNet.layersInParamOrder();
        if (whole.length != replica.length) {
            throw new IllegalArgumentException("replica layers=" + replica.length + ": must equal the whole model's "
                    + whole.length);
        }
        for (int i = 0; i < whole.length; i++) {
            int local = 0;
            if (replica[i] instanceof MoELayerImpl) {
                local = ((MoELayer) replica[i].conf().getLayer()).getNumLocalExperts();
            }
            for (Map.Entry<String, INDArray> p : replica[i].paramTable().entrySet()) {
                String key = p.getKey();
                boolean expert = replica[i] instanceof MoELayerImpl && MoEParamInitializer.isExpertParam(key);
                if (!expert && !toReplica && rank != 0) {
                    continue;
                }
                String wholeKey = expert
                        ? MoEParamInitializer.withExpertIndex(key, rank * local + MoEParamInitializer.expertIndex(key))
                        : key;
                INDArray w = whole[i].getParam(wholeKey);
                if (toReplica) {
                    p.getValue().assign(w);
                } else {
                    w.assign(p.getValue());
                }
            }
        }
    }
}

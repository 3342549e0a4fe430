package org.deepep4j.moe.layers;

import org.deeplearning4j.nn.api.Layer;
import org.deeplearning4j.nn.api.Model;
import org.deeplearning4j.nn.graph.ComputationGraph;
import org.deeplearning4j.nn.multilayer.MultiLayerNetwork;

/**
 * Network-wide synchronisation of MoE layers on the engine block, for readers that bypass the layers (the network's
 * flattened {@code params()}, {@code ModelSerializer}, a direct {@code setParams}). With {@code syncViewsEveryStep}
 * (the default) the views are current after every step and {@link #synchronize} costs nothing.
 */
public final class EngineBlocks {

    private EngineBlocks() {
    }

    /** Engine -> DL4J: every engine-block MoE layer's expert views brought up to date. */
    public static void synchronize(Model model) {
        for (Layer l : layers(model)) {
            if (l instanceof MoELayerImpl) {
                ((MoELayerImpl) l).synchronizeViews();
            }
        }
    }

    /** DL4J -> engine: after writing the network's parameters directly, the engine takes them at its next forward. */
    public static void reload(Model model) {
        for (Layer l : layers(model)) {
            if (l instanceof MoELayerImpl) {
                ((MoELayerImpl) l).viewsChanged();
            }
        }
    }

    /** Closes every MoE layer's engine block (its weights are copied back into DL4J's views first). */
    public static void release(Model model) {
        for (Layer l : layers(model)) {
            if (l instanceof MoELayerImpl) {
                ((MoELayerImpl) l).closeEngine();
            }
        }
    }

    private static Layer[] layers(Model model) {
        if (model instanceof MultiLayerNetwork) {
            return ((MultiLayerNetwork) model).getLayers();
        }
        if (model instanceof ComputationGraph) {
            return ((ComputationGraph) model).getLayers();
        }
        if (model instanceof Layer) {
            return new Layer[]{(Layer) model};
        }
        throw new IllegalArgumentException("model=" + model.getClass().getName() + ": must be a MultiLayerNetwork,"
                + " ComputationGraph or Layer");
    }
}

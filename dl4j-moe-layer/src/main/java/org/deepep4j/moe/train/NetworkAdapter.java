package org.deepep4j.moe.train;

import org.deeplearning4j.nn.api.Layer;
import org.deeplearning4j.nn.api.Model;
import org.deeplearning4j.nn.conf.ComputationGraphConfiguration;
import org.deeplearning4j.nn.conf.MultiLayerConfiguration;
import org.deeplearning4j.nn.graph.ComputationGraph;
import org.deeplearning4j.nn.graph.vertex.GraphVertex;
import org.deeplearning4j.nn.multilayer.MultiLayerNetwork;
import org.deeplearning4j.util.ModelSerializer;
import org.nd4j.linalg.api.ndarray.INDArray;
import org.nd4j.linalg.dataset.api.DataSet;
import org.nd4j.linalg.dataset.api.MultiDataSet;

import java.io.IOException;
import java.io.InputStream;
import java.util.ArrayList;
import java.util.List;

/**
 * What expert-parallel training needs from a DL4J network, for a {@link MultiLayerNetwork} and a
 * {@link ComputationGraph} alike, so that the trainer, the sharding, the gradient mean and the checkpoint have one
 * path each: build from a configuration, layers in the order of the flattened parameters, the flattened gradient,
 * fit one batch, iteration and epoch counts, configuration JSON and {@link ModelSerializer} restore.
 */
abstract class NetworkAdapter {

    /** The kind as written in checkpoints. */
    static final String MULTI_LAYER = "MultiLayerNetwork";
    static final String GRAPH = "ComputationGraph";

    /** Wraps {@code model} (not a copy). */
    static NetworkAdapter of(Model model) {
        if (model instanceof MultiLayerNetwork) {
            return new MultiLayer((MultiLayerNetwork) model);
        }
        if (model instanceof ComputationGraph) {
            return new Graph((ComputationGraph) model);
        }
        throw new IllegalArgumentException("network=" + (model == null ? null : model.getClass().getName())
                + ": must be a MultiLayerNetwork or a ComputationGraph");
    }

    /** A new network of {@code conf} (a copy of it), initialised. */
    static NetworkAdapter build(MultiLayerConfiguration conf) {
        MultiLayerNetwork net = new MultiLayerNetwork(conf.clone());
        net.init();
        return new MultiLayer(net);
    }

    /** A new graph of {@code conf} (a copy of it), initialised. */
    static NetworkAdapter build(ComputationGraphConfiguration conf) {
        ComputationGraph net = new ComputationGraph(conf.clone());
        net.init();
        return new Graph(net);
    }

    /** A new network of the configuration {@code json} of a network of {@code kind}, initialised. */
    static NetworkAdapter fromJson(String kind, String json) {
        switch (kind) {
            case MULTI_LAYER:
                return build(MultiLayerConfiguration.fromJson(json));
            case GRAPH:
                return build(ComputationGraphConfiguration.fromJson(json));
            default:
                throw unknownKind(kind);
        }
    }

    /** A network of {@code kind} as written by {@code ModelSerializer.writeModel(net, out, true)}, updater included. */
    static NetworkAdapter restore(String kind, InputStream in) throws IOException {
        switch (kind) {
            case MULTI_LAYER:
                return new MultiLayer(ModelSerializer.restoreMultiLayerNetwork(in, true));
            case GRAPH:
                return new Graph(ModelSerializer.restoreComputationGraph(in, true));
            default:
                throw unknownKind(kind);
        }
    }

    private static IllegalArgumentException unknownKind(String kind) {
        return new IllegalArgumentException("network kind=" + kind + ": must be " + MULTI_LAYER + " or " + GRAPH);
    }

    abstract Model model();

    abstract String kind();

    abstract String configurationJson();

    /** A copy: parameters, configuration (and updater state, as DL4J's clone() gives it). */
    abstract NetworkAdapter copy();

    /** A new network of this one's configuration whose MoE layers split their experts over {@code ranks}. */
    abstract NetworkAdapter withEpSize(int ranks);

    /** The layers in the order their parameters have in {@link #params()}. */
    abstract Layer[] layersInParamOrder();

    /** The flattened gradient of the last backward pass, a view the updater reads next. */
    abstract INDArray gradients();

    abstract void fit(DataSet batch);

    abstract void fit(MultiDataSet batch);

    abstract int iterationCount();

    abstract int epochCount();

    abstract void incrementEpochCount();

    /**
     * Refuses a network that batches of a DataSetIterator cannot feed, naming what and why; a MultiDataSetIterator
     * feeds any.
     */
    abstract void requireFedByDataSets();

    INDArray params() {
        return model().params();
    }

    private static final class MultiLayer extends NetworkAdapter {
        private final MultiLayerNetwork net;

        MultiLayer(MultiLayerNetwork net) {
            this.net = net;
        }

        @Override Model model() { return net; }
        @Override String kind() { return MULTI_LAYER; }
        @Override String configurationJson() { return net.getLayerWiseConfigurations().toJson(); }
        @Override NetworkAdapter copy() { return new MultiLayer(net.clone()); }
        @Override NetworkAdapter withEpSize(int ranks) {
            return build(ExpertSharding.withEpSize(net.getLayerWiseConfigurations(), ranks));
        }
        @Override Layer[] layersInParamOrder() { return net.getLayers(); }
        @Override INDArray gradients() { return net.getFlattenedGradients(); }
        @Override void fit(DataSet batch) { net.fit(batch); }
        @Override void fit(MultiDataSet batch) { net.fit(batch); }
        @Override int iterationCount() { return net.getIterationCount(); }
        @Override int epochCount() { return net.getEpochCount(); }
        @Override void incrementEpochCount() { net.incrementEpochCount(); }
        @Override void requireFedByDataSets() { }
    }

    private static final class Graph extends NetworkAdapter {
        private final ComputationGraph net;

        Graph(ComputationGraph net) {
            this.net = net;
        }

        @Override Model model() { return net; }
        @Override String kind() { return GRAPH; }
        @Override String configurationJson() { return net.getConfiguration().toJson(); }
        @Override NetworkAdapter copy() { return new Graph(net.clone()); }
        @Override NetworkAdapter withEpSize(int ranks) {
            return build(ExpertSharding.withEpSize(net.getConfiguration(), ranks));
        }

        /** DL4J flattens a graph's parameters vertex by vertex in topological order. */
        @Override Layer[] layersInParamOrder() {
            GraphVertex[] vertices = net.getVertices();
            List<Layer> layers = new ArrayList<>();
            for (int v : net.topologicalSortOrder()) {
                if (vertices[v].hasLayer()) {
                    layers.add(vertices[v].getLayer());
                }
            }
            return layers.toArray(new Layer[0]);
        }

        @Override INDArray gradients() { return net.getFlattenedGradients(); }
        @Override void fit(DataSet batch) { net.fit(batch); }
        @Override void fit(MultiDataSet batch) { net.fit(batch); }
        @Override int iterationCount() { return net.getIterationCount(); }
        @Override int epochCount() { return net.getEpochCount(); }
        @Override void incrementEpochCount() { net.incrementEpochCount(); }

        @Override void requireFedByDataSets() {
            ComputationGraphConfiguration c = net.getConfiguration();
            if (c.getNetworkInputs().size() != 1 || c.getNetworkOutputs().size() != 1) {
                throw new IllegalArgumentException("network: ComputationGraph with inputs " + c.getNetworkInputs()
                        + " and outputs " + c.getNetworkOutputs() + ": a DataSetIterator gives one features and one"
                        + " labels array per batch, so it feeds only a graph with exactly one input and one output;"
                        + " give this graph a MultiDataSetIterator (iterator(MultiDataSetIterator))");
            }
        }
    }
}

package org.deepep4j.moe.layers;

import org.deepep4j.EpBuffer;
import org.deepep4j.EpConfig;
import org.deepep4j.EpGroup;
import org.deepep4j.EpMoeBlock;
import org.deepep4j.EpMoeConfig;
import org.deepep4j.moe.conf.ExpertResidency;
import org.deepep4j.moe.conf.MoELayer;
import org.deepep4j.moe.conf.ScoreFunction;
import org.deepep4j.moe.exchange.EpBufferExchange;
import org.deepep4j.moe.exchange.ExpertExchange;
import org.deepep4j.moe.params.MoEParamInitializer;
import org.nd4j.linalg.api.buffer.DataType;
import org.nd4j.linalg.api.ndarray.INDArray;
import org.nd4j.linalg.factory.Nd4j;
import org.nd4j.linalg.indexing.NDArrayIndex;

import java.util.ArrayList;
import java.util.List;
import java.util.Map;

/**
 * A MoE layer's engine block and the bookkeeping between it and DL4J's views of the routed experts: parameters,
 * gradients and (Adam) updater state. DL4J keeps each expert matrix column-major inside its flattened views; the
 * engine keeps them row-major, expert-major; every copy converts. Two flags say which side is newer:
 * {@code engineStale} (DL4J's views were written: push before the next forward) and {@code viewsStale} (the engine
 * stepped: pull before DL4J reads).
 */
final class EngineBlock implements AutoCloseable {

    private final MoELayer conf;
    private final MoELayerImpl layer;
    private EpMoeBlock block;
    private EpGroup ownGroup;
    private EpBuffer ownBuffer;
    /** DL4J's updater state of the experts ([m | v] for Adam; null or empty for SGD). */
    private INDArray stateView;
    private boolean engineStale = true;
    private boolean viewsStale;
    private long pulls;
    private long pullNs;
    /**
     * Host array in the engine's layout, kept when copies happen every step (HOST residency, syncViewsEveryStep):
     * the first touch of fresh pages costs more than the copy itself. Otherwise made per copy (no resident extra
     * copy of the experts for rare copies).
     */
    private INDArray staging;

    EngineBlock(MoELayer conf, MoELayerImpl layer) {
        this.conf = conf;
        this.layer = layer;
    }

    private Map<String, INDArray> paramViews() {
        return layer.paramViews();
    }

    /** The block on the exchange's buffer (or on a buffer of the layer's own for epSize 1), made at first use. */
    EpMoeBlock block(ExpertExchange exchange, DataType networkType) {
        EpBuffer buffer = bufferFor(exchange);
        if (block != null && !block.isClosed() && block.buffer() == buffer) {
            return block;
        }
        if (block != null && !block.isClosed()) {
            block.close();
        }
        block = EpMoeBlock.create(buffer, blockConfig(networkType));
        staging = null;
        block.beforeClose(this::pullIfStale);
        engineStale = true;
        viewsStale = false;
        return block;
    }

    private EpBuffer bufferFor(ExpertExchange exchange) {
        if (exchange instanceof EpBufferExchange) {
            return ((EpBufferExchange) exchange).buffer();
        }
        if (conf.getEpSize() != 1) {
            throw new IllegalStateException("MoELayer engineBlock with epSize=" + conf.getEpSize() + ": the exchange is "
                    + exchange.getClass().getSimpleName() + ", not an EpBuffer; train with ExpertParallelTrainer.group("
                    + "EpGroup, EpConfig) so the engine moves the tokens");
        }
        if (ownBuffer == null) {
            EpConfig probe = EpConfig.builder().device(conf.getDevice()).build();
            double gb = probe.bufferSizeHintGb(conf.getNIn() * 2, DataType.FLOAT, 1);  // rows of up to fp64 width
            ownGroup = EpGroup.inProcess(1);
            ownBuffer = ownGroup.buffer(0, probe.toBuilder().bufferSizeGb(Math.max(gb, 1.0 / 1024)).build());
        }
        return ownBuffer;
    }

    private EpMoeConfig blockConfig(DataType networkType) {
        DataType t = networkType == DataType.DOUBLE ? DataType.DOUBLE
                : networkType == DataType.BFLOAT16 ? DataType.BFLOAT16 : DataType.FLOAT;
        if (networkType != DataType.FLOAT && networkType != DataType.DOUBLE && networkType != DataType.BFLOAT16) {
            throw new IllegalArgumentException("MoELayer engineBlock: network dataType=" + networkType
                    + ": must be FLOAT, DOUBLE or BFLOAT16");
        }
        return EpMoeConfig.builder().hidden(conf.getNIn()).ffn(conf.getFfnSize()).numExperts(conf.getNumExperts())
                .topK(conf.getTopK()).dataType(t)
                .score(conf.getScoreFunction() == ScoreFunction.SIGMOID ? EpMoeConfig.Score.SIGMOID : EpMoeConfig.Score.SOFTMAX)
                .normalizeTopK(conf.isNormalizeTopK()).auxLossCoefficient(conf.getAuxLossCoefficient())
                .maxTokens(conf.getEngineMaxTokens()).build();
    }

    boolean isOpen() {
        return block != null && !block.isClosed();
    }

    void stateView(INDArray view) {
        this.stateView = view;
    }

    /** DL4J's views were written (setParams and the like): the engine takes them before its next forward. */
    void viewsChanged() {
        pullIfStale();
        engineStale = true;
    }

    /** Before a forward: writes DL4J's views into the engine when they are newer (every forward for HOST residency). */
    void pushIfStale() {
        if (!engineStale && conf.getExpertResidency() == ExpertResidency.ENGINE) {
            return;
        }
        block.write(EpMoeBlock.Tensor.PARAMS, toEngineOrder(paramViews()));
        if (conf.getExpertResidency() == ExpertResidency.ENGINE && hasMoments()) {
            block.write(EpMoeBlock.Tensor.STATE_M, toEngineOrder(stateMatrices(0)));
            block.write(EpMoeBlock.Tensor.STATE_V, toEngineOrder(stateMatrices(1)));
        }
        engineStale = false;
    }

    /** After a backward: the experts' gradients (sums over tokens, like the Java path's) into DL4J's gradient views. */
    void pullGradients() {
        fromEngineOrder(EpMoeBlock.Tensor.GRADS, layer.gradViews());
    }

    /** After an engine step. */
    void stepped() {
        viewsStale = true;
    }

    /** Engine -> DL4J's parameter and updater-state views, when the engine is newer. */
    void pullIfStale() {
        if (!viewsStale || !isOpen()) {
            return;
        }
        long t = System.nanoTime();
        fromEngineOrder(EpMoeBlock.Tensor.PARAMS, paramViews());
        if (hasMoments()) {
            fromEngineOrder(EpMoeBlock.Tensor.STATE_M, stateMatrices(0));
            fromEngineOrder(EpMoeBlock.Tensor.STATE_V, stateMatrices(1));
        }
        viewsStale = false;
        pulls++;
        pullNs += System.nanoTime() - t;
    }

    long pulls() {
        return pulls;
    }

    long pullNs() {
        return pullNs;
    }

    private boolean hasMoments() {
        return stateView != null && stateView.length() > 0;
    }

    /** The expert matrices of one Adam moment (0 = m, 1 = v) inside DL4J's state view, column-major like the params. */
    private Map<String, INDArray> stateMatrices(int moment) {
        long half = stateView.length() / 2;
        INDArray row = stateView.reshape(1, stateView.length());
        Map<String, INDArray> out = new java.util.LinkedHashMap<>();
        long offset = moment * half;
        for (String key : expertKeys()) {
            long[] s = paramViews().get(key).shape();
            long n = s[0] * s[1];
            out.put(key, row.get(NDArrayIndex.interval(0, 0, true), NDArrayIndex.interval(offset, offset + n))
                    .reshape('f', s[0], s[1]));
            offset += n;
        }
        if (offset != (moment + 1) * half) {
            throw new IllegalStateException("MoELayer engine block: updater state of " + stateView.length()
                    + " elements does not hold two moments of the " + half + " expert parameters");
        }
        return out;
    }

    private List<String> expertKeys() {
        List<String> keys = new ArrayList<>();
        for (int j = 0; j < conf.getNumLocalExperts(); j++) {
            keys.add(MoEParamInitializer.expertKey(j, "W1"));
            keys.add(MoEParamInitializer.expertKey(j, "W3"));
            keys.add(MoEParamInitializer.expertKey(j, "W2"));
        }
        return keys;
    }

    /** DL4J's expert matrices, each flattened row-major, concatenated in engine order. */
    private INDArray toEngineOrder(Map<String, INDArray> views) {
        INDArray flat = staging();
        long offset = 0;
        for (String key : expertKeys()) {
            INDArray v = views.get(key);
            long n = v.length();
            flat.get(NDArrayIndex.interval(offset, offset + n)).reshape('c', v.size(0), v.size(1)).assign(v);
            offset += n;
        }
        return flat;
    }

    /** The host array of one engine tensor (FLOAT, or DOUBLE for fp64 networks); see {@link #staging}. */
    private INDArray staging() {
        DataType host = paramViews().values().iterator().next().dataType() == DataType.DOUBLE ? DataType.DOUBLE : DataType.FLOAT;
        if (staging != null && staging.dataType() == host) {
            return staging;
        }
        INDArray flat;
        try (org.nd4j.linalg.api.memory.MemoryWorkspace ws = Nd4j.getWorkspaceManager().scopeOutOfWorkspaces()) {
            flat = Nd4j.createUninitialized(host, block.tensorLength());
        }
        if (conf.getExpertResidency() == ExpertResidency.HOST || conf.isSyncViewsEveryStep()) {
            staging = flat;
        }
        return flat;
    }

    private void fromEngineOrder(EpMoeBlock.Tensor tensor, Map<String, INDArray> views) {
        INDArray flat = staging();
        block.read(tensor, flat);
        long offset = 0;
        for (String key : expertKeys()) {
            INDArray v = views.get(key);
            long n = v.length();
            v.assign(flat.get(NDArrayIndex.interval(offset, offset + n)).reshape('c', v.size(0), v.size(1)));
            offset += n;
        }
    }

    /** Closes the block (pulling the engine's weights first) and the layer's own buffer, if any. */
    @Override
    public void close() {
        if (block != null && !block.isClosed()) {
            block.close();
        }
        block = null;
        staging = null;
        engineStale = true;
        if (ownBuffer != null) {
            ownBuffer.close();
            ownGroup.close();
            ownBuffer = null;
            ownGroup = null;
        }
    }
}

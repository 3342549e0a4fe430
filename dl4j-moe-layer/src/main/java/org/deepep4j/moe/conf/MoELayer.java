package org.deepep4j.moe.conf;

import org.deepep4j.EpDevice;
import org.deepep4j.moe.layers.MoELayerImpl;
import org.deepep4j.moe.params.MoEParamInitializer;
import org.deeplearning4j.nn.api.ParamInitializer;
import org.deeplearning4j.nn.conf.InputPreProcessor;
import org.deeplearning4j.nn.conf.NeuralNetConfiguration;
import org.deeplearning4j.nn.conf.inputs.InputType;
import org.deeplearning4j.nn.conf.layers.FeedForwardLayer;
import org.deeplearning4j.nn.conf.memory.LayerMemoryReport;
import org.deeplearning4j.nn.conf.memory.MemoryReport;
import org.deeplearning4j.optimize.api.TrainingListener;
import org.nd4j.linalg.api.buffer.DataType;
import org.nd4j.linalg.api.ndarray.INDArray;
import org.nd4j.linalg.learning.config.IUpdater;
import org.nd4j.linalg.learning.config.NoOp;
import org.nd4j.linalg.learning.regularization.Regularization;

import java.util.Collection;
import java.util.Collections;
import java.util.List;
import java.util.Map;
import java.util.Objects;

/**
 * Mixture-of-Experts layer configuration: a router picks {@code topK} of {@code numExperts} SwiGLU experts per token.
 * Output size equals input size. Accepts feed-forward {@code [mb, nIn]} and recurrent {@code [mb, nIn, T]} input.
 * With {@code epSize = R} the layer holds {@code numExperts / R} experts (those of its rank) and moves tokens with an
 * {@link org.deepep4j.moe.exchange.ExpertExchange}; the expert-parallel trainer sets this, users normally leave it at 1.
 */
public class MoELayer extends FeedForwardLayer {

    private int numExperts;
    private int topK;
    private int ffnSize;
    private ScoreFunction scoreFunction = ScoreFunction.SOFTMAX;
    private boolean normalizeTopK = true;
    private double auxLossCoefficient;
    private double biasUpdateRate;
    private int sharedExpertFfnSize;
    private int epSize = 1;
    private boolean asyncCombine;
    private boolean engineBlock;
    private EpDevice device = EpDevice.CPU;
    private ExpertResidency expertResidency = ExpertResidency.ENGINE;
    private boolean syncViewsEveryStep = true;
    private int engineMaxTokens = 8192;
    /** The updater DL4J runs for this layer's experts on the engine path (one per layer object, bound to its impl). */
    private transient EngineStepUpdater engineStepUpdater;

    /** For JSON. */
    public MoELayer() {
    }

    private MoELayer(Builder b) {
        super(b);
        numExperts = b.numExperts;
        topK = b.topK;
        ffnSize = b.ffnSize;
        scoreFunction = b.scoreFunction;
        normalizeTopK = b.normalizeTopK;
        auxLossCoefficient = b.auxLossCoefficient;
        biasUpdateRate = b.biasUpdateRate;
        sharedExpertFfnSize = b.sharedExpertFfnSize;
        epSize = b.epSize;
        asyncCombine = b.asyncCombine;
        engineBlock = b.engineBlock;
        device = b.device;
        expertResidency = b.expertResidency;
        syncViewsEveryStep = b.syncViewsEveryStep;
        engineMaxTokens = b.engineMaxTokens;
        if (nOut <= 0 && nIn > 0) {
            nOut = nIn;
        }
        validate();
        initializeConstraints(b);
    }

    /** Checks every setting; each failure names the setting, its value and the rule. */
    public void validate() {
        require(numExperts >= 1, "numExperts", numExperts, "must be >= 1");
        require(topK >= 1 && topK <= numExperts, "topK", topK, "must be in [1, numExperts=" + numExperts + "]");
        require(ffnSize >= 1, "ffnSize", ffnSize, "must be >= 1");
        require(scoreFunction != null, "scoreFunction", null, "must be SOFTMAX or SIGMOID");
        require(auxLossCoefficient >= 0 && Double.isFinite(auxLossCoefficient), "auxLossCoefficient",
                auxLossCoefficient, "must be finite and >= 0");
        require(biasUpdateRate >= 0 && Double.isFinite(biasUpdateRate), "biasUpdateRate", biasUpdateRate,
                "must be finite and >= 0");
        require(sharedExpertFfnSize >= 0, "sharedExpertFfnSize", sharedExpertFfnSize, "must be >= 0 (0 = none)");
        require(epSize >= 1, "epSize", epSize, "must be >= 1");
        require(numExperts % epSize == 0, "numExperts", numExperts,
                "must be divisible by epSize=" + epSize + " so every rank holds the same number of experts");
        require(nIn <= 0 || nOut <= 0 || nIn == nOut, "nOut", nOut, "must equal nIn=" + nIn
                + " (a MoE layer maps hidden size to hidden size)");
        require(device != null, "device", null, "must be CPU or CUDA");
        require(device == EpDevice.CPU || engineBlock, "device", device,
                "needs engineBlock(true): on CUDA the whole MoE block runs in the engine");
        require(expertResidency != null, "expertResidency", null, "must be ENGINE or HOST");
        require(engineMaxTokens >= 1, "engineMaxTokens", engineMaxTokens, "must be >= 1");
        if (engineBlock && expertResidency == ExpertResidency.ENGINE && getIUpdater() != null) {
            EngineStepUpdater.checkSupported(getIUpdater(), regularization);
        }
    }

    /** True when the engine updates the experts (engine block with {@link ExpertResidency#ENGINE}). */
    public boolean expertsUpdatedByEngine() {
        return engineBlock && expertResidency == ExpertResidency.ENGINE;
    }

    private static void require(boolean ok, String setting, Object value, String rule) {
        if (!ok) {
            throw new IllegalArgumentException("MoELayer " + setting + "=" + value + ": " + rule);
        }
    }

    public int getNumLocalExperts() {
        return numExperts / epSize;
    }

    @Override
    public org.deeplearning4j.nn.api.Layer instantiate(NeuralNetConfiguration conf,
            Collection<TrainingListener> trainingListeners, int layerIndex, INDArray layerParamsView,
            boolean initializeParams, DataType networkDataType) {
        validate();
        if (expertsUpdatedByEngine() && getIUpdater() == null) {
            throw new IllegalArgumentException("MoELayer updater=null: the engine block updates the experts with the"
                    + " network's updater; set one (Sgd, Adam)");
        }
        require(nIn > 0, "nIn", nIn, "must be > 0 (set it or give the network an input type)");
        MoELayerImpl ret = new MoELayerImpl(conf, networkDataType);
        if (expertsUpdatedByEngine()) {
            engineStepUpdater().bind(ret);
        }
        ret.setListeners(trainingListeners);
        ret.setIndex(layerIndex);
        ret.setParamsViewArray(layerParamsView);
        Map<String, INDArray> paramTable = initializer().init(conf, layerParamsView, initializeParams);
        ret.setParamTable(paramTable);
        ret.setConf(conf);
        return ret;
    }

    @Override
    public ParamInitializer initializer() {
        return MoEParamInitializer.getInstance();
    }

    @Override
    public InputType getOutputType(int layerIndex, InputType inputType) {
        if (inputType instanceof InputType.InputTypeRecurrent) {
            InputType.InputTypeRecurrent r = (InputType.InputTypeRecurrent) inputType;
            return InputType.recurrent(nIn, r.getTimeSeriesLength(), r.getFormat());
        }
        if (inputType instanceof InputType.InputTypeFeedForward) {
            return InputType.feedForward(nIn);
        }
        throw new IllegalArgumentException("MoELayer inputType=" + inputType
                + ": must be feed-forward [mb, nIn] or recurrent [mb, nIn, T]");
    }

    @Override
    public void setNIn(InputType inputType, boolean override) {
        long size;
        if (inputType instanceof InputType.InputTypeRecurrent) {
            size = ((InputType.InputTypeRecurrent) inputType).getSize();
        } else if (inputType instanceof InputType.InputTypeFeedForward) {
            size = ((InputType.InputTypeFeedForward) inputType).getSize();
        } else {
            throw new IllegalArgumentException("MoELayer inputType=" + inputType
                    + ": must be feed-forward [mb, nIn] or recurrent [mb, nIn, T]");
        }
        if (nIn <= 0 || override) {
            // an nOut of its own (not the one derived from an earlier nIn) that differs is a mistake, not a hint
            require(nOut <= 0 || nOut == size || nOut == nIn, "nOut", nOut, "must equal the input size " + size
                    + " (a MoE layer maps hidden size to hidden size; leave nOut unset)");
            nIn = size;
            nOut = size;
        }
    }

    /** Tokens are rows of either input kind, so no preprocessor is needed. */
    @Override
    public InputPreProcessor getPreProcessorForInputType(InputType inputType) {
        return null;
    }

    /** The router bias moves by load statistics, not by an optimiser: its update is applied as given. */
    @Override
    public IUpdater getUpdaterByParam(String paramName) {
        if (MoEParamInitializer.ROUTER_BIAS.equals(paramName)) {
            return new NoOp();
        }
        if (expertsUpdatedByEngine() && MoEParamInitializer.isExpertParam(paramName)) {
            return engineStepUpdater();
        }
        return super.getUpdaterByParam(paramName);
    }

    /** The updater of this layer object's experts on the engine path: it asks the engine to step them. */
    private synchronized EngineStepUpdater engineStepUpdater() {
        if (engineStepUpdater == null) {
            engineStepUpdater = new EngineStepUpdater(getIUpdater());
        }
        return engineStepUpdater;
    }

    @Override
    public MoELayer clone() {
        MoELayer c = (MoELayer) super.clone();
        c.engineStepUpdater = null;  // a clone gets its own, bound to its own layer
        return c;
    }

    @Override
    public List<Regularization> getRegularizationByParam(String paramName) {
        if (MoEParamInitializer.ROUTER_BIAS.equals(paramName)) {
            return Collections.emptyList();
        }
        if (expertsUpdatedByEngine() && MoEParamInitializer.isExpertParam(paramName)) {
            return Collections.emptyList();  // weight decay is the engine's (AdamW)
        }
        return regularization == null ? Collections.emptyList() : regularization;
    }

    @Override
    public boolean isPretrainParam(String paramName) {
        return false;
    }

    @Override
    public LayerMemoryReport getMemoryReport(InputType inputType) {
        InputType outputType = getOutputType(-1, inputType);
        long numParams = initializer().numParams(this);
        long updaterState = 0;
        for (Map.Entry<String, long[]> p : MoEParamInitializer.shapes(this).entrySet()) {
            IUpdater u = getUpdaterByParam(p.getKey());
            updaterState += u == null ? 0 : u.stateSize(p.getValue()[0] * p.getValue()[1]);
        }
        // per example: router scores + per chosen expert the two hidden activations and the output, plus output
        long perEx = numExperts + (long) topK * (2L * ffnSize + nIn) + nIn;
        return new LayerMemoryReport.Builder(layerName, MoELayer.class, inputType, outputType)
                .standardMemory(numParams, updaterState)
                .workingMemory(0, perEx, MemoryReport.CACHE_MODE_ALL_ZEROS, MemoryReport.CACHE_MODE_ALL_ZEROS)
                .cacheMemory(MemoryReport.CACHE_MODE_ALL_ZEROS, MemoryReport.CACHE_MODE_ALL_ZEROS)
                .build();
    }

    public int getNumExperts() { return numExperts; }
    public void setNumExperts(int numExperts) { this.numExperts = numExperts; }
    public int getTopK() { return topK; }
    public void setTopK(int topK) { this.topK = topK; }
    public int getFfnSize() { return ffnSize; }
    public void setFfnSize(int ffnSize) { this.ffnSize = ffnSize; }
    public ScoreFunction getScoreFunction() { return scoreFunction; }
    public void setScoreFunction(ScoreFunction scoreFunction) { this.scoreFunction = scoreFunction; }
    public boolean isNormalizeTopK() { return normalizeTopK; }
    public void setNormalizeTopK(boolean normalizeTopK) { this.normalizeTopK = normalizeTopK; }
    public double getAuxLossCoefficient() { return auxLossCoefficient; }
    public void setAuxLossCoefficient(double auxLossCoefficient) { this.auxLossCoefficient = auxLossCoefficient; }
    public double getBiasUpdateRate() { return biasUpdateRate; }
    public void setBiasUpdateRate(double biasUpdateRate) { this.biasUpdateRate = biasUpdateRate; }
    public int getSharedExpertFfnSize() { return sharedExpertFfnSize; }
    public void setSharedExpertFfnSize(int sharedExpertFfnSize) { this.sharedExpertFfnSize = sharedExpertFfnSize; }
    public int getEpSize() { return epSize; }
    public void setEpSize(int epSize) { this.epSize = epSize; }
    public boolean isAsyncCombine() { return asyncCombine; }
    public void setAsyncCombine(boolean asyncCombine) { this.asyncCombine = asyncCombine; }
    public boolean isEngineBlock() { return engineBlock; }
    public void setEngineBlock(boolean engineBlock) { this.engineBlock = engineBlock; }
    public EpDevice getDevice() { return device; }
    public void setDevice(EpDevice device) { this.device = device; }
    public ExpertResidency getExpertResidency() { return expertResidency; }
    public void setExpertResidency(ExpertResidency r) { this.expertResidency = r; }
    public boolean isSyncViewsEveryStep() { return syncViewsEveryStep; }
    public void setSyncViewsEveryStep(boolean b) { this.syncViewsEveryStep = b; }
    public int getEngineMaxTokens() { return engineMaxTokens; }
    public void setEngineMaxTokens(int n) { this.engineMaxTokens = n; }

    @Override
    public boolean equals(Object o) {
        if (this == o) return true;
        if (!(o instanceof MoELayer) || !super.equals(o)) return false;
        MoELayer m = (MoELayer) o;
        return numExperts == m.numExperts && topK == m.topK && ffnSize == m.ffnSize
                && scoreFunction == m.scoreFunction && normalizeTopK == m.normalizeTopK
                && Double.compare(auxLossCoefficient, m.auxLossCoefficient) == 0
                && Double.compare(biasUpdateRate, m.biasUpdateRate) == 0
                && sharedExpertFfnSize == m.sharedExpertFfnSize && epSize == m.epSize
                && asyncCombine == m.asyncCombine && engineBlock == m.engineBlock && device == m.device
                && expertResidency == m.expertResidency && syncViewsEveryStep == m.syncViewsEveryStep
                && engineMaxTokens == m.engineMaxTokens;
    }

    @Override
    protected boolean canEqual(Object other) {
        return other instanceof MoELayer;
    }

    @Override
    public int hashCode() {
        return Objects.hash(super.hashCode(), numExperts, topK, ffnSize, scoreFunction, normalizeTopK,
                auxLossCoefficient, biasUpdateRate, sharedExpertFfnSize, epSize, asyncCombine, engineBlock, device,
                expertResidency, syncViewsEveryStep, engineMaxTokens);
    }

    @Override
    public String toString() {
        return "MoELayer(nIn=" + nIn + ", numExperts=" + numExperts + ", topK=" + topK + ", ffnSize=" + ffnSize
                + ", scoreFunction=" + scoreFunction + ", normalizeTopK=" + normalizeTopK + ", auxLossCoefficient="
                + auxLossCoefficient + ", biasUpdateRate=" + biasUpdateRate + ", sharedExpertFfnSize="
                + sharedExpertFfnSize + ", epSize=" + epSize + ", asyncCombine=" + asyncCombine + ", engineBlock="
                + engineBlock + ", device=" + device + ", expertResidency=" + expertResidency + ", syncViewsEveryStep="
                + syncViewsEveryStep + ", engineMaxTokens=" + engineMaxTokens + ")";
    }

    /** Builder in DL4J style: {@code new MoELayer.Builder().nIn(64).numExperts(8).topK(2).ffnSize(128).build()}. */
    public static class Builder extends FeedForwardLayer.Builder<Builder> {
        private int numExperts = 8;
        private int topK = 2;
        private int ffnSize = -1;
        private ScoreFunction scoreFunction = ScoreFunction.SOFTMAX;
        private boolean normalizeTopK = true;
        private double auxLossCoefficient;
        private double biasUpdateRate;
        private int sharedExpertFfnSize;
        private int epSize = 1;
        private boolean asyncCombine;
        private boolean engineBlock;
        private EpDevice device = EpDevice.CPU;
        private ExpertResidency expertResidency = ExpertResidency.ENGINE;
        private boolean syncViewsEveryStep = true;
        private int engineMaxTokens = 8192;

        public Builder numExperts(int numExperts) { this.numExperts = numExperts; return this; }
        public Builder topK(int topK) { this.topK = topK; return this; }
        /** Hidden size of each SwiGLU expert. */
        public Builder ffnSize(int ffnSize) { this.ffnSize = ffnSize; return this; }
        public Builder scoreFunction(ScoreFunction f) { this.scoreFunction = f; return this; }
        /** Divide the chosen top-k scores by their sum. */
        public Builder normalizeTopK(boolean b) { this.normalizeTopK = b; return this; }
        /** Switch-style load-balancing loss {@code coef * E * sum_e f_e * P_e}, added to the network score. */
        public Builder auxLossCoefficient(double c) { this.auxLossCoefficient = c; return this; }
        /** Aux-loss-free balancing: per step the selection bias of an over-loaded expert moves down by this much. */
        public Builder biasUpdateRate(double r) { this.biasUpdateRate = r; return this; }
        /** Adds an always-on SwiGLU expert of this hidden size (0 = none). */
        public Builder sharedExpertFfnSize(int s) { this.sharedExpertFfnSize = s; return this; }
        /** Number of ranks the experts are split over; set by the expert-parallel trainer. */
        public Builder epSize(int epSize) { this.epSize = epSize; return this; }
        /** Overlap the combine with the shared expert's computation on a background thread. */
        public Builder asyncCombine(boolean b) { this.asyncCombine = b; return this; }
        /**
         * Run router, dispatch, experts, combine and their backward in the engine ({@link org.deepep4j.EpMoeBlock}) on
         * the EP buffer's device; only x, y, their gradients and the router weights cross per step.
         */
        public Builder engineBlock(boolean b) { this.engineBlock = b; return this; }
        /**
         * Device of the layer's own engine buffer when it is not trained by {@code ExpertParallelTrainer} (which
         * takes the device from its EpConfig); CUDA needs {@link #engineBlock(boolean) engineBlock(true)}.
         */
        public Builder device(EpDevice d) { this.device = d; return this; }
        /** Where expert weights are authoritative on the engine path (default ENGINE). */
        public Builder expertResidency(ExpertResidency r) { this.expertResidency = r; return this; }
        /**
         * ENGINE residency: copy the experts' weights, gradients and optimizer state back into DL4J's views after
         * every step (default true), so every reader of the network (ModelSerializer, listeners, {@code params()})
         * sees current values. With false they are copied only when read through the layer or on
         * {@link org.deepep4j.moe.layers.EngineBlocks#synchronize}; a raw read of the network's flattened params
         * between steps then sees the weights of the last synchronisation.
         */
        public Builder syncViewsEveryStep(boolean b) { this.syncViewsEveryStep = b; return this; }
        /** Largest token count of one forward on the engine path (default 8192): workspaces are sized for it. */
        public Builder engineMaxTokens(int n) { this.engineMaxTokens = n; return this; }

        @Override
        @SuppressWarnings("unchecked")
        public MoELayer build() {
            return new MoELayer(this);
        }
    }
}

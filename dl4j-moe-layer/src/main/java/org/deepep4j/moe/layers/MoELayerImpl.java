package org.deepep4j.moe.layers;

import org.deepep4j.moe.conf.MoELayer;
import org.deepep4j.moe.exchange.ExpertExchange;
import org.deepep4j.moe.exchange.LocalExchange;
import org.deepep4j.moe.params.MoEParamInitializer;
import org.deeplearning4j.nn.conf.NeuralNetConfiguration;
import org.deeplearning4j.nn.gradient.DefaultGradient;
import org.deeplearning4j.nn.gradient.Gradient;
import org.deeplearning4j.nn.layers.BaseLayer;
import org.deeplearning4j.nn.workspace.ArrayType;
import org.deeplearning4j.nn.workspace.LayerWorkspaceMgr;
import org.nd4j.common.primitives.Pair;
import org.nd4j.linalg.api.buffer.DataType;
import org.nd4j.linalg.api.memory.MemoryWorkspace;
import org.nd4j.linalg.api.ndarray.INDArray;
import org.nd4j.linalg.factory.Nd4j;

import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.Future;
import java.util.concurrent.TimeUnit;

/**
 * MoE layer implementation. Forward: router -> dispatch -> local experts grouped by expert -> combine (+ shared
 * expert). Backward runs the same path reversed: cached dispatch of the output gradient, expert backward, combine of
 * the input gradients and routing-weight gradients, router backward. Everything between input and output is computed
 * outside DL4J's workspaces because it is kept for backward; input and output live where DL4J puts them.
 */
public class MoELayerImpl extends BaseLayer<MoELayer> {

    /** How long an asynchronous combine may take before the layer gives up. */
    private static final long ASYNC_TIMEOUT_S = 600;

    private transient ExpertExchange exchange;
    private transient ExecutorService combineThread;
    private transient Forward cache;
    private transient double lastAuxLoss;
    private transient int[] lastLoad;
    private transient int[] lastReceived;
    private transient RoutingMode routingMode = RoutingMode.NORMAL;
    private transient INDArray recordedRouting;
    private transient PhaseTimes times = new PhaseTimes();
    /** The engine block path ({@code engineBlock(true)}); null on the Java path. */
    private transient EngineBlock engine;
    private transient long lastMinibatch = 1;
    /**
     * Between the engine path's backward and the engine's step: DL4J's updater reads the layer's parameter table for
     * its structure (keys, lengths) there, which must not cost a copy of every expert per step.
     */
    private transient boolean stepInProgress;
    /**
     * Engine-held experts: whether DL4J's expert gradient views hold something (the engine's gradients, copied for
     * {@code syncViewsEveryStep}). Otherwise they stay zero, DL4J's step subtracts nothing from the experts, and no
     * pass of DL4J's over them (divide, zero, trainer's mean) has work to do.
     */
    private transient boolean expertGradientsWritten = true;  // until the first step zeroes them: content unknown

    public MoELayerImpl(NeuralNetConfiguration conf, DataType dataType) {
        super(conf, dataType);
    }

    /** State of one forward, kept for backward. */
    private static final class Forward {
        long[] inputShape;
        Router router;
        ExpertExchange.Dispatched dispatched;
        LocalExperts experts;
        SwiGlu shared;
        /** Engine path: tokens and per-expert load of the forward (for the selection-bias step). */
        long tokens;
        int[] load;
    }

    /** Binds the rank's exchange; needed when {@code epSize > 1}. */
    public void setExchange(ExpertExchange exchange) {
        if (exchange != null && exchange.numRanks() != layerConf().getEpSize()) {
            throw new IllegalArgumentException("exchange numRanks=" + exchange.numRanks() + ": must equal the layer's epSize="
                    + layerConf().getEpSize());
        }
        this.exchange = exchange;
    }

    private EngineBlock engine() {
        if (engine == null) {
            engine = new EngineBlock(layerConf(), this);
        }
        return engine;
    }

    /** DL4J's parameter views by key, without synchronisation (the engine path's own reads and writes). */
    Map<String, INDArray> paramViews() {
        return params;
    }

    Map<String, INDArray> gradViews() {
        return gradientViews;
    }

    @Override
    public void setBackpropGradientsViewArray(INDArray gradients) {
        super.setBackpropGradientsViewArray(gradients);
        expertGradientsWritten = true;  // a new view: zeroed by the next step before anything relies on it
    }

    /** True when this layer runs on the engine block. */
    public boolean isEngineBlock() {
        return layerConf().isEngineBlock();
    }

    /**
     * Engine -> DL4J: brings the experts' parameter and updater-state views up to date with the engine (no-op when they
     * are current or on the Java path). Reads through this layer do it themselves.
     */
    public void synchronizeViews() {
        if (engine != null) {
            long t = engine.pullNs();
            engine.pullIfStale();
            times.syncNs += engine.pullNs() - t;
        }
    }

    /** DL4J -> engine: the experts' views were written directly; the engine takes them before its next forward. */
    public void viewsChanged() {
        if (engine != null) {
            engine.viewsChanged();
        }
    }

    /** How many times the engine's experts were copied into DL4J's views (a cost counter, for tests and benchmarks). */
    public long viewSynchronizations() {
        return engine == null ? 0 : engine.pulls();
    }

    /**
     * True when DL4J's gradient views of the routed experts hold this step's gradients: always on the Java path and for
     * {@link org.deepep4j.moe.conf.ExpertResidency#HOST}; for engine-held experts only when the engine's gradients were
     * copied into them ({@code syncViewsEveryStep}), else they are zero and passes over them are skipped.
     */
    public boolean expertGradientsInViews() {
        return !layerConf().expertsUpdatedByEngine() || expertGradientsWritten;
    }

    /**
     * Called by DL4J's updater (through {@link org.deepep4j.moe.conf.EngineStepUpdater}): the engine steps the experts;
     * {@code gradient} (DL4J's expert gradient block) is left zero, so DL4J's step leaves the expert views as they are.
     */
    public void engineStep(int iteration, int epoch, INDArray gradient) {
        MoELayer c = layerConf();
        if (engine == null || !engine.isOpen()) {
            throw new IllegalStateException("MoELayer engine step: no engine block (no forward/backward before the update)");
        }
        long t = System.nanoTime();
        engine.block(getExchange(), dataType).step(org.deepep4j.moe.conf.EngineStepUpdater.optimizer(c.getIUpdater(),
                c.getRegularization(), iteration, epoch, 1.0 / ((double) lastMinibatch * c.getEpSize())));
        engine.stepped();
        stepInProgress = false;
        if (expertGradientsWritten) {  // else zero already: never written since the last step zeroed it
            gradient.assign(0.0);
            expertGradientsWritten = false;
        }
        times.engineStepNs += System.nanoTime() - t;
        if (c.isSyncViewsEveryStep()) {
            synchronizeViews();
        }
    }

    /** Called when DL4J's updater hands its state view of the experts to {@link org.deepep4j.moe.conf.EngineStepUpdater}. */
    public void engineStateView(INDArray view) {
        engine().stateView(view);
    }

    // DL4J reads of the parameters go through these: on the engine path they see the engine's current weights.

    @Override
    public INDArray params() {
        synchronizeViewsOutsideStep();
        return super.params();
    }

    @Override
    public Map<String, INDArray> paramTable() {
        synchronizeViewsOutsideStep();
        return super.paramTable();
    }

    @Override
    public Map<String, INDArray> paramTable(boolean backpropParamsOnly) {
        synchronizeViewsOutsideStep();
        return super.paramTable(backpropParamsOnly);
    }

    /** As {@link #synchronizeViews()}, except inside DL4J's update of this step (see {@link #stepInProgress}). */
    private void synchronizeViewsOutsideStep() {
        if (!stepInProgress) {
            synchronizeViews();
        }
    }

    @Override
    public INDArray getParam(String param) {
        synchronizeViews();
        return super.getParam(param);
    }

    @Override
    public void setParam(String key, INDArray val) {
        synchronizeViews();
        super.setParam(key, val);
        viewsChanged();
    }

    @Override
    public void setParams(INDArray params) {
        synchronizeViews();
        super.setParams(params);
        viewsChanged();
    }

    @Override
    public void setParamTable(Map<String, INDArray> paramTable) {
        synchronizeViews();
        super.setParamTable(paramTable);
        if (engine != null) {
            engine.close();
            engine = null;  // the views themselves changed: a new block binds them
        }
    }

    public ExpertExchange getExchange() {
        if (exchange == null) {
            if (layerConf().getEpSize() != 1) {
                throw new IllegalStateException("MoELayer epSize=" + layerConf().getEpSize()
                        + ": no expert exchange bound; train with ExpertParallelTrainer or call setExchange");
            }
            return LocalExchange.INSTANCE;
        }
        return exchange;
    }

    /** Global id of this replica's first expert. */
    public int firstExpert() {
        return getExchange().rank() * layerConf().getNumLocalExperts();
    }

    public void setRoutingMode(RoutingMode mode) {
        this.routingMode = mode;
    }

    public RoutingMode getRoutingMode() {
        return routingMode;
    }

    /** The [N, K] expert ids of the last recorded forward (or the routing to replay). */
    public INDArray getRecordedRouting() {
        return recordedRouting;
    }

    /** Sets the [N, K] expert ids to replay and switches to {@link RoutingMode#REPLAY}. */
    public void replayRouting(INDArray topkIdx) {
        this.recordedRouting = topkIdx;
        this.routingMode = RoutingMode.REPLAY;
    }

    /** Phase times since the start of the last forward. */
    public PhaseTimes phaseTimes() {
        return times.copy();
    }

    /** Value of the load-balancing loss of the last forward. */
    public double auxLoss() {
        return lastAuxLoss;
    }

    /** Tokens per global expert chosen in the last forward of this rank. */
    public int[] lastLoad() {
        return lastLoad == null ? null : lastLoad.clone();
    }

    /** Rows this rank received per local expert (global id {@link #firstExpert()} + j) in the last forward. */
    public int[] lastReceived() {
        return lastReceived == null ? null : lastReceived.clone();
    }

    @Override
    public Type type() {
        return Type.FEED_FORWARD;
    }

    @Override
    public boolean isPretrainLayer() {
        return false;
    }

    @Override
    public boolean updaterDivideByMinibatch(String paramName) {
        // The selection-bias step is a per-iteration amount, not a sum over examples. Engine-held experts: the engine
        // scales its own gradient (the step's gradScale); DL4J's view of it is zero or discarded by the step.
        if (layerConf().expertsUpdatedByEngine() && MoEParamInitializer.isExpertParam(paramName)) {
            return false;
        }
        return !MoEParamInitializer.ROUTER_BIAS.equals(paramName);
    }

    @Override
    public INDArray activate(boolean training, LayerWorkspaceMgr workspaceMgr) {
        assertInputSet(false);
        applyDropOutIfNecessary(training, workspaceMgr);
        // The engine block writes y straight into DL4J's activation workspace, which DL4J reuses step after step:
        // a fresh array per step would cost the first touch of its pages, more than the GPU's whole transfer.
        INDArray into = engineWritesInPlace(input)
                ? workspaceMgr.createUninitialized(ArrayType.ACTIVATIONS, dataType, input.shape(), 'c') : null;
        INDArray out;
        try (MemoryWorkspace ws = Nd4j.getWorkspaceManager().scopeOutOfWorkspaces()) {
            Forward f = new Forward();
            f.inputShape = input.shape();
            INDArray tokens = into != null ? engineTokens(input) : toTokens(input, "input");
            releaseCache();
            INDArray y = forward(tokens, f, into);
            cache = f;
            out = fromTokens(y, f.inputShape);
        }
        if (out == into) {
            return into;
        }
        INDArray ret = workspaceMgr.createUninitialized(ArrayType.ACTIVATIONS, out.dataType(), out.shape(), 'c');
        return ret.assign(out);
    }

    /**
     * Whether the engine block can read {@code a} ([mb, nIn] of the block's type) as its tokens and write its result
     * into an array DL4J provides. (The engine keeps its own copy of x for backward, so x needs no copy here.)
     */
    private boolean engineWritesInPlace(INDArray a) {
        return layerConf().isEngineBlock() && a.rank() == 2 && a.size(1) == layerConf().getNIn() && a.dataType() == dataType
                && (dataType == DataType.FLOAT || dataType == DataType.DOUBLE || dataType == DataType.BFLOAT16);
    }

    /** {@code a} itself when dense C-order (and no shared expert keeps it past this call), else a dense copy. */
    private INDArray engineTokens(INDArray a) {
        boolean dense = a.ordering() == 'c' && org.nd4j.linalg.api.shape.Shape.hasDefaultStridesForShape(a);
        return dense && layerConf().getSharedExpertFfnSize() == 0 ? a : a.dup('c');
    }

    /** The layer's forward on tokens; the engine block writes y into {@code into} when given (else a new array). */
    private INDArray forward(INDArray x, Forward f, INDArray into) {
        MoELayer c = layerConf();
        times.reset();
        lastMinibatch = input.size(0);
        stepInProgress = false;  // a backward without an update (gradient checks, computeGradientAndScore) ends here
        if (c.isEngineBlock()) {
            return engineForward(x, f, into);
        }
        ExpertExchange ex = getExchange();
        long t0 = System.nanoTime();
        INDArray replay = routingMode == RoutingMode.REPLAY ? requireRecorded() : null;
        f.router = new Router(c, x, getParam(MoEParamInitializer.ROUTER_WEIGHT),
                getParam(MoEParamInitializer.ROUTER_BIAS), replay, describe(ex),
                f.inputShape.length == 3 ? f.inputShape[2] : 0);
        lastAuxLoss = f.router.auxLoss;
        lastLoad = f.router.load;
        if (routingMode == RoutingMode.RECORD) {
            recordedRouting = f.router.topkIdxArray();
        }
        long t1 = System.nanoTime();
        f.dispatched = ex.dispatch(x, f.router.topkIdxArray(), f.router.weightsArray(), c.getNumExperts());
        long t2 = System.nanoTime();
        lastReceived = f.dispatched.recvTokensPerExpert();
        f.experts = new LocalExperts(f.dispatched.recvX(), f.dispatched.recvTopkIdx(), f.dispatched.recvTopkWeights(),
                expertParams(false));
        long t3 = System.nanoTime();
        times.routingNs += t1 - t0;
        times.dispatchNs += t2 - t1;
        times.expertNs += t3 - t2;
        if (c.isAsyncCombine()) {
            Future<ExpertExchange.Combined> pending = combineThread().submit(() -> timedCombine(f, f.experts.y, null));
            INDArray shared = sharedForward(x, f);
            INDArray out = await(pending).out();
            return shared == null ? out : out.add(shared);
        }
        INDArray out = timedCombine(f, f.experts.y, null).out();
        INDArray shared = sharedForward(x, f);
        return shared == null ? out : out.add(shared);
    }

    /** Router, dispatch, experts and combine in the engine; the shared expert (if any) on the host meanwhile. */
    private INDArray engineForward(INDArray x, Forward f, INDArray into) {
        MoELayer c = layerConf();
        long t0 = System.nanoTime();
        org.deepep4j.EpMoeBlock block = engine().block(getExchange(), dataType);
        engine.pushIfStale();
        long t1 = System.nanoTime();
        INDArray replay = routingMode == RoutingMode.REPLAY ? requireRecorded() : null;
        long[] staged0 = block.stagingStats();
        INDArray wr = params.get(MoEParamInitializer.ROUTER_WEIGHT);
        INDArray br = params.get(MoEParamInitializer.ROUTER_BIAS);
        // before the engine's collective step, as on the Java path: a NaN row is named here, not routed anywhere
        Router.checkFiniteInput(x, wr, describe(getExchange()), f.inputShape.length == 3 ? f.inputShape[2] : 0);
        org.deepep4j.EpMoeForward out;
        INDArray shared;
        if (c.isAsyncCombine()) {
            org.deepep4j.EpMoeBlock.Pending pending = block.forwardAsync(x, wr, br, replay, into);
            shared = sharedForward(x, f);  // host work while the engine runs; y exists only after await()
            out = pending.await();
        } else {
            out = block.forward(x, wr, br, replay, into);
            shared = sharedForward(x, f);
        }
        times.syncNs += t1 - t0;
        times.engineNs += System.nanoTime() - t1 - times.sharedNs;
        addStaging(staged0, block.stagingStats());
        f.tokens = x.size(0);
        f.load = out.expertLoad();
        lastAuxLoss = out.auxLoss();
        lastLoad = out.expertLoad();
        lastReceived = out.recvPerLocalExpert();
        if (routingMode == RoutingMode.RECORD) {
            recordedRouting = out.topkIdx();
        }
        INDArray y = out.y().dataType() == x.dataType() ? out.y() : out.y().castTo(x.dataType());
        return shared == null ? y : into != null ? y.addi(shared) : y.add(shared);
    }

    private INDArray engineBackward(INDArray g, Forward f, INDArray into) {
        MoELayer c = layerConf();
        long t0 = System.nanoTime();
        org.deepep4j.EpMoeBlock block = engine.block(getExchange(), dataType);
        long[] staged0 = block.stagingStats();
        org.deepep4j.EpMoeBackward b = block.backward(g, input.size(0), false, into);
        addStaging(staged0, block.stagingStats());
        stepInProgress = layerConf().expertsUpdatedByEngine();  // until the engine's step (or the next forward)
        long t1 = System.nanoTime();
        times.engineNs += t1 - t0;
        gradientViews.get(MoEParamInitializer.ROUTER_WEIGHT).assign(b.gradRouterWeight());
        INDArray gBias = gradientViews.get(MoEParamInitializer.ROUTER_BIAS);
        if (c.getBiasUpdateRate() > 0) {
            gBias.assign(Nd4j.createFromArray(biasStep(f, c.getBiasUpdateRate())).reshape(gBias.shape()));
        } else {
            gBias.assign(0.0);
        }
        if (c.getExpertResidency() == org.deepep4j.moe.conf.ExpertResidency.HOST || c.isSyncViewsEveryStep()) {
            engine.pullGradients();
            expertGradientsWritten = c.expertsUpdatedByEngine();
        }
        times.syncNs += System.nanoTime() - t1;
        INDArray gShared = sharedBackward(g, f);
        INDArray gx = b.gradX().dataType() == g.dataType() ? b.gradX() : b.gradX().castTo(g.dataType());
        return gShared == null ? gx : into != null ? gx.addi(gShared) : gx.add(gShared);
    }

    private void addStaging(long[] before, long[] after) {
        times.stagingBytes += after[0] - before[0] + after[1] - before[1];
        times.stagingNs += after[2] - before[2];
    }

    /** Aux-loss-free balancing step of the selection bias (as {@link Router#biasStep}), from the engine's load. */
    private static double[] biasStep(Forward f, double rate) {
        int e = f.load.length;
        int k = 0;
        for (int l : f.load) {
            k += l;
        }
        double mean = f.tokens == 0 ? 0 : k / (double) e;  // n * K / E
        double[] step = new double[e];
        for (int c = 0; c < e; c++) {
            step[c] = -rate * Math.signum(mean - f.load[c]);
        }
        return step;
    }

    /** "MoELayer 'name' (layer 1) on rank 0", for errors. */
    private String describe(ExpertExchange ex) {
        String name = layerConf().getLayerName();
        return "MoELayer " + (name == null ? "" : "'" + name + "' ") + "(layer " + getIndex() + ") on rank " + ex.rank();
    }

    private INDArray requireRecorded() {
        if (recordedRouting == null) {
            throw new IllegalStateException("routing replay: mode is REPLAY but no routing was recorded or given");
        }
        return recordedRouting;
    }

    private ExpertExchange.Combined timedCombine(Forward f, INDArray y, INDArray yTopkWeights) {
        long t = System.nanoTime();
        ExpertExchange.Combined r = f.dispatched.combine(y, yTopkWeights);
        times.combineNs += System.nanoTime() - t;
        return r;
    }

    private INDArray sharedForward(INDArray x, Forward f) {
        if (layerConf().getSharedExpertFfnSize() == 0) {
            return null;
        }
        long t = System.nanoTime();
        f.shared = new SwiGlu(x, params.get("sW1"), params.get("sW3"), params.get("sW2"));
        times.sharedNs += System.nanoTime() - t;
        return f.shared.y;
    }

    @Override
    public Pair<Gradient, INDArray> backpropGradient(INDArray epsilon, LayerWorkspaceMgr workspaceMgr) {
        assertInputSet(true);
        if (cache == null) {
            throw new IllegalStateException("MoELayer backprop: no forward pass to differentiate (call activate first)");
        }
        // as in activate: the engine writes the gradient into DL4J's (reused) workspace memory
        INDArray into = engineWritesInPlace(epsilon)
                ? workspaceMgr.createUninitialized(ArrayType.ACTIVATION_GRAD, dataType, epsilon.shape(), 'c') : null;
        INDArray gInput;
        try (MemoryWorkspace ws = Nd4j.getWorkspaceManager().scopeOutOfWorkspaces()) {
            INDArray g = into != null ? engineTokens(epsilon) : toTokens(epsilon, "epsilon");
            gInput = fromTokens(backward(g, cache, into), cache.inputShape);
        }
        Gradient ret = new DefaultGradient(gradientsFlattened);
        for (String key : MoEParamInitializer.getInstance().paramKeys(layerConf())) {
            ret.gradientForVariable().put(key, gradientViews.get(key));
        }
        INDArray eps = gInput;
        if (gInput != into) {
            eps = workspaceMgr.createUninitialized(ArrayType.ACTIVATION_GRAD, gInput.dataType(), gInput.shape(), 'c');
            eps.assign(gInput);
        }
        return new Pair<>(ret, backpropDropOutIfPresent(eps));
    }

    private INDArray backward(INDArray g, Forward f, INDArray into) {
        MoELayer c = layerConf();
        if (c.isEngineBlock()) {
            return engineBackward(g, f, into);
        }
        long t0 = System.nanoTime();
        INDArray gy = f.dispatched.dispatchCached(g);
        long t1 = System.nanoTime();
        INDArray[] ge = f.experts.backward(gy, expertParams(true));
        long t2 = System.nanoTime();
        times.dispatchNs += t1 - t0;
        times.expertNs += t2 - t1;
        ExpertExchange.Combined back;
        INDArray gShared = null;
        if (c.isAsyncCombine()) {
            Future<ExpertExchange.Combined> pending = combineThread().submit(() -> timedCombine(f, ge[0], ge[1]));
            gShared = sharedBackward(g, f);
            back = await(pending);
        } else {
            back = timedCombine(f, ge[0], ge[1]);
            gShared = sharedBackward(g, f);
        }
        long t3 = System.nanoTime();
        double[] gWeights = back.outTopkWeights().dup('c').data().asDouble();
        INDArray[] gr = f.router.backward(gWeights, getParam(MoEParamInitializer.ROUTER_WEIGHT), input.size(0));
        gradientViews.get(MoEParamInitializer.ROUTER_WEIGHT).assign(gr[1]);
        INDArray gBias = gradientViews.get(MoEParamInitializer.ROUTER_BIAS);
        if (c.getBiasUpdateRate() > 0) {
            gBias.assign(Nd4j.createFromArray(f.router.biasStep(c.getBiasUpdateRate())).reshape(gBias.shape()));
        } else {
            gBias.assign(0.0);
        }
        times.routingNs += System.nanoTime() - t3;
        INDArray gx = back.out().add(gr[0]);
        return gShared == null ? gx : gx.addi(gShared);
    }

    private INDArray sharedBackward(INDArray g, Forward f) {
        if (f.shared == null) {
            return null;
        }
        long t = System.nanoTime();
        INDArray[] b = f.shared.backward(g);
        gradientViews.get("sW1").assign(b[1]);
        gradientViews.get("sW3").assign(b[2]);
        gradientViews.get("sW2").assign(b[3]);
        times.sharedNs += System.nanoTime() - t;
        return b[0];
    }

    /** Per local expert {w1, w3, w2}, from the parameters or the gradient views. */
    private List<INDArray[]> expertParams(boolean gradients) {
        List<INDArray[]> out = new ArrayList<>();
        for (int j = 0; j < layerConf().getNumLocalExperts(); j++) {
            String k1 = MoEParamInitializer.expertKey(j, "W1");
            String k3 = MoEParamInitializer.expertKey(j, "W3");
            String k2 = MoEParamInitializer.expertKey(j, "W2");
            out.add(gradients
                    ? new INDArray[]{gradientViews.get(k1), gradientViews.get(k3), gradientViews.get(k2)}
                    : new INDArray[]{getParam(k1), getParam(k3), getParam(k2)});
        }
        return out;
    }

    private synchronized ExecutorService combineThread() {
        if (combineThread == null) {
            combineThread = Executors.newSingleThreadExecutor(r -> {
                Thread t = new Thread(r, "moe-combine-layer-" + getIndex());
                t.setDaemon(true);
                return t;
            });
        }
        return combineThread;
    }

    private static <T> T await(Future<T> f) {
        try {
            return f.get(ASYNC_TIMEOUT_S, TimeUnit.SECONDS);
        } catch (java.util.concurrent.TimeoutException e) {
            throw new IllegalStateException("MoELayer asynchronous combine did not finish within " + ASYNC_TIMEOUT_S + " s", e);
        } catch (java.util.concurrent.ExecutionException e) {
            Throwable cause = e.getCause();
            if (cause instanceof RuntimeException) {
                throw (RuntimeException) cause;
            }
            throw new IllegalStateException("MoELayer asynchronous combine failed", cause);
        } catch (InterruptedException e) {
            Thread.currentThread().interrupt();
            throw new IllegalStateException("MoELayer asynchronous combine interrupted", e);
        }
    }

    /** [mb, nIn] stays; [mb, nIn, T] becomes [mb*T, nIn] (token t of example b at row b*T + t). Always a fresh copy. */
    private INDArray toTokens(INDArray a, String what) {
        long nIn = layerConf().getNIn();
        if (a.rank() == 2 && a.size(1) == nIn) {
            return a.dup('c');
        }
        if (a.rank() == 3 && a.size(1) == nIn) {
            return a.permute(0, 2, 1).dup('c').reshape('c', a.size(0) * a.size(2), nIn);
        }
        throw new IllegalArgumentException("MoELayer " + what + " shape=" + java.util.Arrays.toString(a.shape())
                + ": must be [mb, " + nIn + "] or [mb, " + nIn + ", T]");
    }

    private static INDArray fromTokens(INDArray t, long[] shape) {
        if (shape.length == 2) {
            return t;
        }
        return t.reshape('c', shape[0], shape[2], shape[1]).permute(0, 2, 1).dup('c');
    }

    @Override
    public double calcRegularizationScore(boolean backpropParamsOnly) {
        // BaseLayer's version reads paramTable(), which on the engine path would copy the experts back every step.
        double score = 0;
        for (Map.Entry<String, INDArray> p : params.entrySet()) {
            List<org.nd4j.linalg.learning.regularization.Regularization> rs = layerConf().expertsUpdatedByEngine()
                    && MoEParamInitializer.isExpertParam(p.getKey())
                    ? layerConf().getRegularization()  // applied by the engine (AdamW), scored here on DL4J's views
                    : layerConf().getRegularizationByParam(p.getKey());
            if (rs == null) {
                continue;
            }
            for (org.nd4j.linalg.learning.regularization.Regularization r : rs) {
                score += r.score(p.getValue(), getIterationCount(), getEpochCount());
            }
        }
        return score + lastAuxLoss;
    }

    @Override
    public void clear() {
        super.clear();
        releaseCache();
    }

    /** Frees the previous forward's dispatch handle (native memory when the exchange is an EpBuffer). */
    private void releaseCache() {
        if (cache != null && cache.dispatched != null) {
            cache.dispatched.close();
        }
        cache = null;
    }

    /** Closes the engine block (weights copied back into DL4J's views first); the next forward makes a new one. */
    public void closeEngine() {
        if (engine != null) {
            engine.close();
            engine = null;
        }
    }

    @Override
    public void close() {
        if (engine != null) {
            engine.close();
            engine = null;
        }
        if (combineThread != null) {
            combineThread.shutdownNow();
            combineThread = null;
        }
    }
}

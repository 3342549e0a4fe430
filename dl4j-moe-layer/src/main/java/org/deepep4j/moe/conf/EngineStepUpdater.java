package org.deepep4j.moe.conf;

import org.deepep4j.EpOptimizer;
import org.deepep4j.moe.layers.MoELayerImpl;
import org.nd4j.linalg.api.ndarray.INDArray;
import org.nd4j.linalg.indexing.NDArrayIndex;
import org.nd4j.linalg.learning.GradientUpdater;
import org.nd4j.linalg.learning.config.Adam;
import org.nd4j.linalg.learning.config.IUpdater;
import org.nd4j.linalg.learning.config.Sgd;
import org.nd4j.linalg.learning.regularization.Regularization;
import org.nd4j.linalg.learning.regularization.WeightDecay;
import org.nd4j.linalg.schedule.ISchedule;

import java.util.Collections;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;

/**
 * DL4J's updater for a MoE layer's routed experts when the engine holds them: at the point where DL4J would update
 * the experts, it asks the layer's engine block to apply the network's updater (SGD, Adam; Adam + WeightDecay as
 * AdamW) to its own weights and gradients; DL4J's expert update is left zero so DL4J's step leaves them alone. Its
 * state view has the wrapped updater's size and layout (Adam: [m | v]), so saved models keep the engine's moments.
 * Equal only to itself: each layer's experts form their own updater block.
 */
public final class EngineStepUpdater implements IUpdater {

    private final IUpdater inner;
    private transient MoELayerImpl owner;

    EngineStepUpdater(IUpdater inner) {
        this.inner = inner;
    }

    /** Refuses updaters and regularisation the engine does not implement, naming them and the alternatives. */
    static void checkSupported(IUpdater u, List<Regularization> regularization) {
        if (!(u instanceof Sgd) && !(u instanceof Adam)) {
            throw new IllegalArgumentException("MoELayer updater=" + u.getClass().getSimpleName() + ": with engineBlock"
                    + " and expertResidency ENGINE the engine updates the experts and implements Sgd and Adam (Adam +"
                    + " WeightDecay(coeff, applyLR=true) runs as AdamW); use one of them or expertResidency(HOST)");
        }
        for (Regularization r : regularization == null ? Collections.<Regularization>emptyList() : regularization) {
            boolean ok = r instanceof WeightDecay && ((WeightDecay) r).isApplyLR() && u instanceof Adam
                    && regularization.size() == 1;
            if (!ok) {
                throw new IllegalArgumentException("MoELayer regularization=" + r + ": with engineBlock and expertResidency"
                        + " ENGINE the only regularization the engine applies to experts is one WeightDecay(coeff,"
                        + " applyLR=true) with Adam (AdamW); use expertResidency(HOST) for others");
            }
        }
    }

    /** The engine step DL4J's settings ask for at this iteration. */
    public static EpOptimizer optimizer(IUpdater u, List<Regularization> regularization, int iteration, int epoch,
                                        double gradScale) {
        double lr = u.getLearningRate(iteration, epoch);
        if (u instanceof Sgd) {
            return EpOptimizer.builder(EpOptimizer.Kind.SGD).learningRate(lr).iteration(iteration).gradScale(gradScale).build();
        }
        Adam a = (Adam) u;
        double decay = 0;
        if (regularization != null && !regularization.isEmpty()) {
            ISchedule c = ((WeightDecay) regularization.get(0)).getCoeff();
            decay = c.valueAt(iteration, epoch);
        }
        EpOptimizer.Builder b = EpOptimizer.builder(decay > 0 ? EpOptimizer.Kind.ADAMW : EpOptimizer.Kind.ADAM)
                .learningRate(lr).beta1(a.getBeta1()).beta2(a.getBeta2()).epsilon(a.getEpsilon())
                .iteration(iteration).gradScale(gradScale);
        if (decay > 0) {
            b.weightDecay(decay);
        }
        return b.build();
    }

    /** Binds the layer whose engine block this updater steps. */
    public void bind(MoELayerImpl layer) {
        this.owner = layer;
    }

    public IUpdater inner() {
        return inner;
    }

    @Override
    public long stateSize(long numParams) {
        return inner.stateSize(numParams);
    }

    @Override
    public GradientUpdater instantiate(INDArray viewArray, boolean initializeViewArray) {
        Step s = new Step();
        s.setStateViewArray(viewArray, viewArray == null ? null : viewArray.shape(), 'c', initializeViewArray);
        return s;
    }

    @Override
    public GradientUpdater instantiate(Map<String, INDArray> updaterState, boolean initializeStateArrays) {
        throw new UnsupportedOperationException("EngineStepUpdater: state maps (SameDiff training) are not supported;"
                + " the MoE engine block trains inside a DL4J MultiLayerNetwork or ComputationGraph");
    }

    @Override
    public boolean equals(Object o) {
        return this == o;
    }

    @Override
    public int hashCode() {
        return System.identityHashCode(this);
    }

    @Override
    public EngineStepUpdater clone() {
        return new EngineStepUpdater(inner.clone());
    }

    @Override
    public double getLearningRate(int iteration, int epoch) {
        return inner.getLearningRate(iteration, epoch);
    }

    @Override
    public boolean hasLearningRate() {
        return inner.hasLearningRate();
    }

    @Override
    public void setLrAndSchedule(double lr, ISchedule lrSchedule) {
        inner.setLrAndSchedule(lr, lrSchedule);
    }

    /** The per-block updater DL4J calls once per iteration. */
    private final class Step implements GradientUpdater<EngineStepUpdater> {
        private INDArray state;

        @Override
        public EngineStepUpdater getConfig() {
            return EngineStepUpdater.this;
        }

        @Override
        public void setState(Map<String, INDArray> stateMap, boolean initialize) {
            throw new UnsupportedOperationException("EngineStepUpdater: state maps are not supported");
        }

        @Override
        public Map<String, INDArray> getState() {
            Map<String, INDArray> m = new LinkedHashMap<>();
            if (state != null && state.length() > 0) {
                long half = state.length() / 2;
                INDArray flat = state.reshape(state.length());
                m.put("M", flat.get(NDArrayIndex.interval(0, half)));
                m.put("V", flat.get(NDArrayIndex.interval(half, state.length())));
            }
            return m;
        }

        @Override
        public void setStateViewArray(INDArray viewArray, long[] gradientShape, char gradientOrder, boolean initialize) {
            state = viewArray;
            if (state != null && initialize) {
                state.assign(0.0);
            }
            if (owner != null) {
                owner.engineStateView(state);
            }
        }

        @Override
        public void applyUpdater(INDArray gradient, int iteration, int epoch) {
            if (owner == null) {
                throw new IllegalStateException("EngineStepUpdater: not bound to a MoE layer (the layer configuration"
                        + " was used outside MoELayer.instantiate)");
            }
            // DL4J's step subtracts the gradient from the expert views: the layer leaves it zero, so they stay as
            // the engine left them (zeroing only what it wrote: most steps no pass over the experts here)
            owner.engineStep(iteration, epoch, gradient);
        }
    }
}

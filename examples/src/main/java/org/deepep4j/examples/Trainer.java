package org.deepep4j.examples;

import java.io.PrintStream;
import java.time.Duration;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Locale;
import java.util.Map;
import org.deepep4j.EpConfig;
import org.deepep4j.EpDispatch;
import org.deepep4j.EpGroup;
import org.deepep4j.moe.conf.MoELayer;
import org.deepep4j.moe.layers.MoELayerImpl;
import org.deepep4j.moe.layers.PhaseTimes;
import org.deepep4j.moe.layers.RoutingMode;
import org.deepep4j.moe.params.MoEParamInitializer;
import org.deepep4j.moe.train.ExpertParallelTrainer;
import org.deepep4j.moe.train.PhaseTimingListener;
import org.deeplearning4j.nn.api.Model;
import org.deeplearning4j.nn.conf.MultiLayerConfiguration;
import org.deeplearning4j.nn.conf.NeuralNetConfiguration;
import org.deeplearning4j.nn.conf.inputs.InputType;
import org.deeplearning4j.nn.conf.layers.LossLayer;
import org.deeplearning4j.nn.multilayer.MultiLayerNetwork;
import org.deeplearning4j.nn.weights.WeightInit;
import org.deeplearning4j.optimize.api.BaseTrainingListener;
import org.deeplearning4j.optimize.api.TrainingListener;
import org.nd4j.linalg.activations.Activation;
import org.nd4j.linalg.api.buffer.DataType;
import org.nd4j.linalg.api.ndarray.INDArray;
import org.nd4j.linalg.factory.Nd4j;
import org.nd4j.linalg.learning.config.Adam;
import org.nd4j.linalg.lossfunctions.LossFunctions;

/**
 * Trains the MoE model expert-parallel over in-process ranks: a DL4J network with a {@link MoELayer}, trained by the
 * {@link ExpertParallelTrainer} over an {@link EpGroup#inProcess in-process group} (one thread and one EpBuffer per
 * rank; the router is replicated, the experts are sharded).
 */
public final class Trainer {
    /** Bound on any single collective wait; a stuck rank turns into an error on all ranks. */
    private static final Duration COLLECTIVE_TIMEOUT = Duration.ofSeconds(60);
    /** Weight of the Switch-style load-balancing loss, which keeps the router from favouring a few experts. */
    static final double AUX_LOSS = 0.01;

    private Trainer() {}

    /**
     * The model: one MoE layer ({@code --experts} SwiGLU experts of width {@code --expert-hidden}, softmax router,
     * top-{@code --top-k}) mapping a token to its prediction, scored by mean squared error; Adam with {@code --lr},
     * weights seeded by {@code --seed}. The chosen experts' router probabilities are renormalised to sum 1 when k > 1;
     * with k = 1 the weight stays the probability itself, so the router still learns from the loss.
     */
    public static MultiLayerConfiguration network(Options o) {
        return new NeuralNetConfiguration.Builder()
                .seed(o.seed)
                .dataType(DataType.FLOAT)
                .weightInit(WeightInit.XAVIER)
                .updater(new Adam(o.learningRate))
                .list()
                .layer(new MoELayer.Builder().numExperts(o.experts).topK(o.topK).ffnSize(o.expertHidden)
                        .normalizeTopK(o.topK > 1).auxLossCoefficient(AUX_LOSS).build())
                .layer(new LossLayer.Builder(LossFunctions.LossFunction.MSE).activation(Activation.IDENTITY).build())
                .setInputType(InputType.feedForward(o.hidden))
                .build();
    }

    /** Runs the training described by {@code o}; progress and per-epoch loss go to {@code out}. */
    public static TrainingResult train(Options o, PrintStream out) throws Exception {
        EpConfig cfg = EpConfig.builder()
                .dispatch(o.dispatch.equals("alltoall") ? EpDispatch.ALLTOALL : EpDispatch.DEEPEP)
                .bufferSizeGb(0.0625)
                .timeout(COLLECTIVE_TIMEOUT)
                .build();
        // Ranks are threads that each compute their own share; ND4J's own worker threads on top of them would only
        // compete for the same cores (small matmuls got ~10x slower on 2 cores), so each op runs on its caller's thread.
        Nd4j.getEnvironment().setMaxMasterThreads(1);
        Nd4j.getEnvironment().setMaxThreads(1);
        if (Nd4j.factory().blas() instanceof org.nd4j.nativeblas.Nd4jBlas blas) blas.setMaxThreads(1);
        TaskMixture data = new TaskMixture(o.tasks, o.hidden, o.seed);
        TaskMixtureIterator batches = new TaskMixtureIterator(data, o);
        StepLog log = new StepLog(o, out);
        RankStats[] stats = new RankStats[o.ranks];
        long start = System.nanoTime();
        try (EpGroup group = EpGroup.inProcess(o.ranks)) {
            ExpertParallelTrainer trainer = ExpertParallelTrainer.builder()
                    .group(group, cfg)
                    .timeout(COLLECTIVE_TIMEOUT)
                    .network(network(o))
                    .iterator(batches)
                    .epochs(o.epochs)
                    .rankListeners(rank -> {
                        PhaseTimingListener timing = new PhaseTimingListener("rank " + rank + " ", false);
                        stats[rank] = new RankStats(o, rank, timing, batches, log);
                        return List.<TrainingListener>of(timing, stats[rank]);
                    })
                    .build();
            // Every replica keeps its last routing, so each step's top-k choices can be counted per task.
            for (int r = 0; r < o.ranks; r++) moe(trainer.replica(r)).setRoutingMode(RoutingMode.RECORD);
            trainer.fit();
            checkReplicasEqual(trainer);
        }
        double seconds = (System.nanoTime() - start) / 1e9;
        return result(o, stats, log, seconds);
    }

    private static MoELayerImpl moe(MultiLayerNetwork net) {
        return (MoELayerImpl) net.getLayer(0);
    }

    /** The router is replicated: the same averaged gradient and the same update on every rank keep it identical. */
    private static void checkReplicasEqual(ExpertParallelTrainer trainer) {
        INDArray router0 = moe(trainer.replica(0)).getParam(MoEParamInitializer.ROUTER_WEIGHT);
        for (int r = 1; r < trainer.ranks(); r++) {
            INDArray router = moe(trainer.replica(r)).getParam(MoEParamInitializer.ROUTER_WEIGHT);
            double d = router.sub(router0).amaxNumber().doubleValue();
            if (d != 0) throw new IllegalStateException("router replicas diverged: rank " + r + " differs by " + d);
        }
    }

    private static TrainingResult result(Options o, RankStats[] stats, StepLog log, double seconds) {
        double[] stepLoss = log.stepLoss.clone();
        double[] epochLoss = new double[o.epochs];
        for (int s = 0; s < stepLoss.length; s++) epochLoss[s / o.stepsPerEpoch] += stepLoss[s] / o.stepsPerEpoch;
        long[][] taskExpert = new long[o.tasks][o.experts];
        long[] received = new long[o.experts];
        Map<String, Long> phases = new LinkedHashMap<>();
        for (int r = 0; r < stats.length; r++) {
            RankStats s = stats[r];
            for (int t = 0; t < o.tasks; t++) {
                for (int e = 0; e < o.experts; e++) taskExpert[t][e] += s.taskExpert[t][e];
            }
            for (int e = 0; e < o.expertsPerRank(); e++) received[r * o.expertsPerRank() + e] = s.receivedPerLocalExpert[e];
            s.phaseNanos.forEach((phase, ns) -> phases.merge(phase, ns, Math::max));
        }
        return new TrainingResult(stepLoss, epochLoss, taskExpert, received, phases, seconds);
    }

    /** Loss per step, mean over ranks; draws the progress bar and the epoch lines once every rank finished a step. */
    private static final class StepLog {
        private final Options o;
        private final PrintStream out;
        private final ProgressBar bar;
        final double[] stepLoss;
        private final int[] reported;

        StepLog(Options o, PrintStream out) {
            this.o = o;
            this.out = out;
            this.bar = new ProgressBar(out, o.totalSteps());
            this.stepLoss = new double[o.totalSteps()];
            this.reported = new int[o.totalSteps()];
        }

        synchronized void record(int step, double loss) {
            stepLoss[step] += loss / o.ranks;
            if (++reported[step] < o.ranks) return;
            int done = step + 1;
            bar.update(done, String.format(Locale.ROOT, "loss %.4f", stepLoss[step]));
            if (done % o.stepsPerEpoch == 0) {
                double mean = 0;
                for (int s = done - o.stepsPerEpoch; s < done; s++) mean += stepLoss[s] / o.stepsPerEpoch;
                if (done < o.totalSteps() && bar.redraws()) out.print("\r\033[K");
                out.printf(Locale.ROOT, "epoch %d/%d  loss %.5f%n", done / o.stepsPerEpoch, o.epochs, mean);
            }
        }
    }

    /**
     * What one rank saw, collected on the rank's thread after each step: the step's loss (the network's score less the
     * load-balancing term), the recorded routing counted per task, the rows each local expert received through
     * dispatch, and the MoE layer's phase times.
     */
    private static final class RankStats extends BaseTrainingListener {
        private final int rank;
        private final PhaseTimingListener timing;
        private final TaskMixtureIterator batches;
        private final StepLog log;
        final long[][] taskExpert;
        final long[] receivedPerLocalExpert;
        final Map<String, Long> phaseNanos = new LinkedHashMap<>();
        private int step;
        private long stepStart = System.nanoTime();

        RankStats(Options o, int rank, PhaseTimingListener timing, TaskMixtureIterator batches, StepLog log) {
            this.rank = rank;
            this.timing = timing;
            this.batches = batches;
            this.log = log;
            this.taskExpert = new long[o.tasks][o.experts];
            this.receivedPerLocalExpert = new long[o.expertsPerRank()];
        }

        @Override
        public void iterationDone(Model model, int iteration, int epoch) {
            MoELayerImpl moe = moe((MultiLayerNetwork) model);
            long[] chosen = moe.getRecordedRouting().castTo(DataType.LONG).dup('c').data().asLong();
            int[] task = batches.takeTasks(step, rank);
            int k = chosen.length / task.length;
            for (int t = 0; t < task.length; t++) {
                for (int j = 0; j < k; j++) taskExpert[task[t]][(int) chosen[t * k + j]]++;
            }
            int[] received = moe.lastReceived();
            for (int e = 0; e < received.length; e++) receivedPerLocalExpert[e] += received[e];

            long now = System.nanoTime();
            PhaseTimes p = timing.lastTimes().get(moe.getIndex());
            long moeNs = add("routing", p.routingMs()) + add("dispatch", p.dispatchMs())
                    + add("expert compute", p.expertMs()) + add("combine", p.combineMs());
            // Data, loss, the gradient mean over ranks (which waits for the slowest rank) and the Adam update.
            phaseNanos.merge("rest of step", Math.max(0, now - stepStart - moeNs), Long::sum);
            stepStart = now;

            log.record(step, model.score() - moe.auxLoss());
            step++;
        }

        private long add(String phase, double ms) {
            long ns = Math.round(ms * 1e6);
            phaseNanos.merge(phase, ns, Long::sum);
            return ns;
        }
    }
}

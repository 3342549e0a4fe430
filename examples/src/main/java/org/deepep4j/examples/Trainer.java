package org.deepep4j.examples;

import java.io.PrintStream;
import java.time.Duration;
import java.util.LinkedHashMap;
import java.util.Locale;
import java.util.Map;
import org.deepep4j.EpBuffer;
import org.deepep4j.EpConfig;
import org.deepep4j.EpDispatch;
import org.deepep4j.EpGroup;
import org.nd4j.linalg.factory.Nd4j;

/** Trains the MoE model expert-parallel over in-process ranks: one thread per rank, each with its own EpBuffer. */
public final class Trainer {
    /** Bound on any single collective wait; a stuck rank turns into an error on all ranks. */
    private static final Duration COLLECTIVE_TIMEOUT = Duration.ofSeconds(60);

    private Trainer() {}

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
        ReplicaReduce reduce = new ReplicaReduce(o.ranks, COLLECTIVE_TIMEOUT);
        ProgressBar bar = new ProgressBar(out, o.totalSteps());
        RankWorker[] workers = new RankWorker[o.ranks];
        long start = System.nanoTime();

        // Bound of the whole run: steps take milliseconds; a rank stuck in a collective fails after COLLECTIVE_TIMEOUT.
        Duration runLimit = Duration.ofSeconds(120 + (long) o.totalSteps() * 10);
        try (EpGroup group = EpGroup.inProcess(o.ranks)) {
            group.runOnAllRanks(rank -> {
                // Creating the buffers is collective: every rank's thread creates its own.
                try (EpBuffer buffer = group.buffer(rank, cfg)) {
                    RankWorker w = new RankWorker(o, rank, buffer, data, reduce);
                    workers[rank] = w;
                    w.train(done -> {
                        if (rank == 0) progress(o, w, bar, out, done);
                    });
                }
                return null;
            }, runLimit);
        }
        double seconds = (System.nanoTime() - start) / 1e9;
        checkReplicasEqual(workers);
        return result(o, workers, seconds);
    }

    private static void progress(Options o, RankWorker w, ProgressBar bar, PrintStream out, int done) {
        bar.update(done, String.format(Locale.ROOT, "loss %.4f", w.stepLoss[done - 1]));
        if (done % o.stepsPerEpoch == 0) {
            int epoch = done / o.stepsPerEpoch;
            double mean = 0;
            for (int s = done - o.stepsPerEpoch; s < done; s++) mean += w.stepLoss[s] / o.stepsPerEpoch;
            if (done < o.totalSteps()) out.print("\r\033[K");
            out.printf(Locale.ROOT, "epoch %d/%d  loss %.5f%n", epoch, o.epochs, mean);
        }
    }

    private static void checkReplicasEqual(RankWorker[] workers) {
        for (int r = 1; r < workers.length; r++) {
            double d = RankWorker.distance(workers[0].gate(), workers[r].gate());
            if (d != 0) throw new IllegalStateException("router replicas diverged: rank " + r + " differs by " + d);
        }
    }

    private static TrainingResult result(Options o, RankWorker[] workers, double seconds) {
        double[] stepLoss = workers[0].stepLoss.clone();
        double[] epochLoss = new double[o.epochs];
        for (int s = 0; s < stepLoss.length; s++) epochLoss[s / o.stepsPerEpoch] += stepLoss[s] / o.stepsPerEpoch;
        long[][] taskExpert = new long[o.tasks][o.experts];
        long[] received = new long[o.experts];
        Map<String, Long> phases = new LinkedHashMap<>();
        for (int r = 0; r < workers.length; r++) {
            RankWorker w = workers[r];
            for (int t = 0; t < o.tasks; t++) {
                for (int e = 0; e < o.experts; e++) taskExpert[t][e] += w.taskExpert[t][e];
            }
            for (int e = 0; e < o.expertsPerRank(); e++) received[r * o.expertsPerRank() + e] = w.receivedPerLocalExpert[e];
            w.timer.totals().forEach((phase, ns) -> phases.merge(phase, ns, Math::max));
        }
        return new TrainingResult(stepLoss, epochLoss, taskExpert, received, phases, seconds);
    }
}

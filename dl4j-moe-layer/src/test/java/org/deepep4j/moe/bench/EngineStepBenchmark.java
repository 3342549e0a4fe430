package org.deepep4j.moe.bench;

import org.deepep4j.EpConfig;
import org.deepep4j.EpDevice;
import org.deepep4j.EpGroup;
import org.deepep4j.moe.conf.MoELayer;
import org.deepep4j.moe.layers.MoELayerImpl;
import org.deepep4j.moe.layers.PhaseTimes;
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
import org.nd4j.linalg.dataset.DataSet;
import org.nd4j.linalg.factory.Nd4j;
import org.nd4j.linalg.learning.config.Adam;
import org.nd4j.linalg.lossfunctions.LossFunctions;

import java.util.ArrayList;
import java.util.Arrays;
import java.util.List;
import java.util.Locale;

/**
 * One MoELayer training step (forward + backward + Adam update, network MoE -> MSE loss, fp32) on the Java CPU path
 * and on the engine block, in the same JVM and on the same data; ranks are in-process threads (on CUDA rank r uses
 * GPU r mod count). Prints the step time (median over the measured steps of rank 0, after warm-up), the engine's
 * phases and the speed-up.
 * Usage: {@code EngineStepBenchmark hidden ffn experts topK ranks tokensPerRank steps paths [syncViewsEveryStep]},
 * paths a comma list of {@code java-cpu, engine-cpu, engine-cuda}; e.g. {@code 2048 768 64 8 2 4096 5 java-cpu,engine-cuda};
 * syncViewsEveryStep {@code false} unless given (the main job's default is {@code true}).
 */
public final class EngineStepBenchmark {

    private EngineStepBenchmark() {
    }

    public static void main(String[] a) {
        int h = a.length > 0 ? Integer.parseInt(a[0]) : 64;
        int f = a.length > 1 ? Integer.parseInt(a[1]) : 128;
        int e = a.length > 2 ? Integer.parseInt(a[2]) : 8;
        int k = a.length > 3 ? Integer.parseInt(a[3]) : 2;
        int ranks = a.length > 4 ? Integer.parseInt(a[4]) : 2;
        int tokens = a.length > 5 ? Integer.parseInt(a[5]) : 512;
        int steps = a.length > 6 ? Integer.parseInt(a[6]) : 10;
        List<String> paths = Arrays.asList((a.length > 7 ? a[7] : "java-cpu,engine-cpu").split(","));
        boolean sync = a.length > 8 && Boolean.parseBoolean(a[8]);
        System.out.printf(Locale.ROOT, "MoELayer training step: hidden %d, ffn %d, %d experts, top-%d, %d ranks x %d tokens,"
                + " fp32, Adam, syncViewsEveryStep %b; median of %d steps after 1 warm-up%n", h, f, e, k, ranks, tokens,
                sync, steps);
        System.out.println("| path | step ms | engine fwd+bwd ms | engine step ms | view sync ms | rest ms | vs java-cpu"
                + " | engine host staging copies ms (share of step) |");
        System.out.println("|---|---|---|---|---|---|---|---|");
        double base = Double.NaN;
        java.util.Map<String, Double> stepMs = new java.util.LinkedHashMap<>();
        for (String p : paths) {
            Result r = run(p.trim(), h, f, e, k, ranks, tokens, steps, sync);
            stepMs.put(p.trim(), r.stepMs);
            if (p.trim().equals("java-cpu")) {
                base = r.stepMs;
            }
            System.out.printf(Locale.ROOT, "| %s | %.2f | %.2f | %.2f | %.2f | %.2f | %s | %s |%n", p.trim(), r.stepMs,
                    r.engineMs, r.engineStepMs, r.syncMs, r.stepMs - r.engineMs - r.engineStepMs - r.syncMs,
                    Double.isNaN(base) ? "-" : String.format(Locale.ROOT, "%.1fx", base / r.stepMs),
                    r.stagingBytes == 0 ? "-" : String.format(Locale.ROOT, "%.2f (%.1f%%), %.1f MB", r.stagingMs,
                            100 * r.stagingMs / r.stepMs, r.stagingBytes / 1e6));
            if (p.trim().equals("engine-cuda")) {
                staging(r.stagingBytes, ranks, r.stepMs);
            }
        }
        if (!Double.isNaN(base)) {  // whatever the order of the paths
            StringBuilder b = new StringBuilder("  speed-up vs java-cpu (same run):");
            for (java.util.Map.Entry<String, Double> m : stepMs.entrySet()) {
                b.append(String.format(Locale.ROOT, " %s %.1fx", m.getKey(), base / m.getValue()));
            }
            System.out.println(b);
        }
    }

    /**
     * The whole host <-> device staging of one step, the transfers included: the step's staged bytes (as the engine
     * counted them on rank 0) copied in and out through a rank's queue (the same pinned staging and copy threads,
     * chunks overlapped with the transfers, into reused host arrays), measured here. The engine's own column above is
     * the host copies alone.
     */
    static void staging(long bytes, int ranks, double stepMs) {
        if (bytes <= 0) {
            return;
        }
        long half = Math.max(1, bytes / 2 / 4);  // about as many bytes in as out: y, grad x out; x, grad y in
        try (EpGroup g = EpGroup.inProcess(1);
             org.deepep4j.EpBuffer buf = g.buffer(0, EpConfig.builder().device(EpDevice.CUDA).bufferSizeGb(0.01).build());
             org.deepep4j.EpDeviceArray d = buf.allocate(DataType.FLOAT, half)) {
            org.nd4j.linalg.api.ndarray.INDArray host = Nd4j.rand(DataType.FLOAT, half);
            org.nd4j.linalg.api.ndarray.INDArray back = Nd4j.create(DataType.FLOAT, half);
            double best = Double.MAX_VALUE;
            for (int i = 0; i < 4; i++) {  // the first also starts the staging memory and threads
                long t0 = System.nanoTime();
                d.copyFrom(host);
                d.copyTo(back);
                best = Math.min(best, (System.nanoTime() - t0) / 1e6);
            }
            // ranks sharing one GPU share its host link: their copies add up
            double ms = best * ranks;
            System.out.printf(Locale.ROOT, "  staging with transfers: %.1f MB per rank per step through a rank's queue in"
                            + " %.2f ms (%.1f GB/s) -> about %.2f ms per step for %d rank(s) = %.1f%% of the %.2f ms step%n",
                    bytes / 1e6, best, bytes / best / 1e6, ms, ranks, 100 * ms / stepMs, stepMs);
        } catch (RuntimeException ex) {
            System.out.println("  staging not measured: " + ex.getMessage());
        }
    }

    static final class Result {
        double stepMs, engineMs, engineStepMs, syncMs, stagingMs;
        long stagingBytes;
    }

    static Result run(String path, int h, int f, int e, int k, int ranks, int tokens, int steps, boolean sync) {
        boolean engine = path.startsWith("engine");
        EpDevice device = path.endsWith("cuda") ? EpDevice.CUDA : EpDevice.CPU;
        MultiLayerConfiguration conf = new NeuralNetConfiguration.Builder().seed(1).dataType(DataType.FLOAT)
                .weightInit(WeightInit.XAVIER).updater(new Adam(1e-3)).list()
                .layer(new MoELayer.Builder().numExperts(e).topK(k).ffnSize(f).engineBlock(engine)
                        .syncViewsEveryStep(sync).engineMaxTokens(tokens).build())
                .layer(new LossLayer.Builder(LossFunctions.LossFunction.MSE).activation(Activation.IDENTITY).build())
                .setInputType(InputType.feedForward(h)).build();
        Nd4j.getRandom().setSeed(7);
        int rows = (steps + 1) * ranks * tokens;
        DataSet data = new DataSet(Nd4j.rand(DataType.FLOAT, rows, h), Nd4j.rand(DataType.FLOAT, rows, h));
        List<Long> stamps = new ArrayList<>();
        PhaseTimingListener timing = new PhaseTimingListener("");
        double[][] phases = new double[steps + 1][5];
        TrainingListener clock = new BaseTrainingListener() {
            @Override
            public void iterationDone(Model model, int iteration, int epoch) {
                stamps.add(System.nanoTime());
                PhaseTimes t = timing.lastTimes().get(0);
                if (t != null && stamps.size() <= phases.length) {
                    phases[stamps.size() - 1] = new double[]{t.engineMs(), t.engineStepMs(), t.viewSyncMs(), t.stagingMs(),
                        t.stagingBytes()};
                }
            }
        };
        long start;
        try (EpGroup group = EpGroup.inProcess(ranks)) {
            ExpertParallelTrainer t = ExpertParallelTrainer.builder()
                    .group(group, EpConfig.builder().device(device).bufferSizeGb(0.5).build())
                    .network(conf).iterator(new org.nd4j.linalg.dataset.ViewIterator(data, tokens)).epochs(1)
                    .listeners(timing, clock).build();
            start = System.nanoTime();
            t.fit();
            long s0 = System.nanoTime();
            MultiLayerNetwork whole = t.wholeNetwork();  // syncs the engine's experts once: measured
            ((MoELayerImpl) whole.getLayer(0)).getParam("e0W1");
            long s1 = System.nanoTime();
            System.out.printf(Locale.ROOT, "  %s: %d steps in %.1f s; gathering every expert after training %.1f ms%n", path,
                    stamps.size(), (s0 - start) / 1e9, (s1 - s0) / 1e6);
        }
        double[] step = new double[stamps.size() - 1];
        for (int i = 1; i < stamps.size(); i++) {
            step[i - 1] = (stamps.get(i) - stamps.get(i - 1)) / 1e6;
        }
        Result r = new Result();
        r.stepMs = median(step);
        double[] en = new double[step.length], st = new double[step.length], sy = new double[step.length];
        double[] sg = new double[step.length], sb = new double[step.length];
        for (int i = 0; i < step.length; i++) {
            en[i] = phases[i + 1][0];
            st[i] = phases[i + 1][1];
            sy[i] = phases[i + 1][2];
            sg[i] = phases[i + 1][3];
            sb[i] = phases[i + 1][4];
        }
        r.stagingMs = median(sg);
        r.stagingBytes = (long) median(sb);
        r.engineMs = median(en);
        r.engineStepMs = median(st);
        r.syncMs = median(sy);
        return r;
    }

    private static double median(double[] v) {
        if (v.length == 0) {
            return Double.NaN;
        }
        double[] s = v.clone();
        Arrays.sort(s);
        return s[s.length / 2];
    }
}

package org.deepep4j.moe.bench;

import org.deepep4j.EpConfig;
import org.deepep4j.EpGroup;
import org.deepep4j.moe.conf.MoELayer;
import org.deepep4j.moe.exchange.EpBufferExchange;
import org.deepep4j.moe.exchange.ExpertExchange;
import org.deepep4j.moe.exchange.JavaExchangeGroup;
import org.deepep4j.moe.layers.MoELayerImpl;
import org.deepep4j.moe.layers.PhaseTimes;
import org.deepep4j.moe.train.ExpertSharding;
import org.deeplearning4j.nn.conf.MultiLayerConfiguration;
import org.deeplearning4j.nn.conf.NeuralNetConfiguration;
import org.deeplearning4j.nn.conf.inputs.InputType;
import org.deeplearning4j.nn.conf.layers.OutputLayer;
import org.deeplearning4j.nn.multilayer.MultiLayerNetwork;
import org.deeplearning4j.nn.workspace.LayerWorkspaceMgr;
import org.nd4j.linalg.activations.Activation;
import org.nd4j.linalg.api.buffer.DataType;
import org.nd4j.linalg.api.ndarray.INDArray;
import org.nd4j.linalg.factory.Nd4j;
import org.nd4j.linalg.learning.config.Sgd;
import org.nd4j.linalg.lossfunctions.LossFunctions;

import java.time.Duration;
import java.util.ArrayList;
import java.util.List;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.Future;
import java.util.concurrent.TimeUnit;
import java.util.function.IntFunction;

/**
 * Where a MoE layer's forward+backward time goes on CPU: routing, dispatch, expert compute, combine (and the share of
 * routing + dispatch + combine). Ranks are threads; dispatch and combine include waiting for the slower rank.
 * Usage: {@code OverheadBenchmark [hidden ffn experts topK ranks tokensPerRank iterations [native|java]]},
 * default 512 1024 8 2 2 1024 10 native (fp32): {@code native} moves tokens with deepep4j's EpBuffer (CPU ranks),
 * {@code java} with the tests' plain-ND4J exchange. Lives in the test sources: run it with
 * {@code mvn -o -q -pl dl4j-moe-layer exec:java -Dexec.classpathScope=test -Dexec.mainClass=org.deepep4j.moe.bench.OverheadBenchmark}.
 */
public final class OverheadBenchmark {

    private OverheadBenchmark() {
    }

    /** Averages over the measured iterations of rank 0 (ms), plus the whole layer time. */
    public static final class Result {
        public double routingMs, dispatchMs, expertMs, combineMs, totalMs;

        public double overheadShare() {
            return (routingMs + dispatchMs + combineMs) / totalMs;
        }

        @Override
        public String toString() {
            return String.format("layer fwd+bwd %.1f ms = routing %.1f + dispatch %.1f + expert compute %.1f + combine %.1f"
                            + " (+ %.1f other); routing+dispatch+combine = %.1f%%", totalMs, routingMs, dispatchMs,
                    expertMs, combineMs, totalMs - routingMs - dispatchMs - expertMs - combineMs, 100 * overheadShare());
        }
    }

    public static Result run(int hidden, int ffn, int experts, int topK, int ranks, int tokens, int iterations,
                             IntFunction<ExpertExchange> exchanges) throws Exception {
        MultiLayerConfiguration conf = new NeuralNetConfiguration.Builder().seed(1).dataType(DataType.FLOAT)
                .updater(new Sgd(1e-3)).list()
                .layer(new MoELayer.Builder().numExperts(experts).topK(topK).ffnSize(ffn).build())
                .layer(new OutputLayer.Builder(LossFunctions.LossFunction.MSE).nOut(hidden)
                        .activation(Activation.IDENTITY).build())
                .setInputType(InputType.feedForward(hidden)).build();
        MultiLayerConfiguration sharded = ExpertSharding.withEpSize(conf, ranks);
        ExecutorService pool = Executors.newFixedThreadPool(ranks);
        try {
            List<Future<Result>> fs = new ArrayList<>();
            for (int r = 0; r < ranks; r++) {
                final int rank = r;
                fs.add(pool.submit(() -> {
                    MultiLayerNetwork net = new MultiLayerNetwork(sharded.clone());
                    net.init();
                    net.initGradientsView();
                    MoELayerImpl moe = (MoELayerImpl) net.getLayer(0);
                    ExpertExchange ex = exchanges.apply(rank);
                    moe.setExchange(ex);
                    Nd4j.getRandom().setSeed(100 + rank);
                    INDArray x = Nd4j.randn(DataType.FLOAT, tokens, hidden);
                    INDArray eps = Nd4j.randn(DataType.FLOAT, tokens, hidden).muli(1e-3);
                    LayerWorkspaceMgr mgr = LayerWorkspaceMgr.noWorkspaces();
                    Result res = new Result();
                    int warmup = 2;
                    for (int it = 0; it < warmup + iterations; it++) {
                        long t = System.nanoTime();
                        moe.activate(x, true, mgr);
                        moe.backpropGradient(eps, mgr);
                        long total = System.nanoTime() - t;
                        if (it >= warmup) {
                            PhaseTimes p = moe.phaseTimes();
                            res.routingMs += p.routingMs() / iterations;
                            res.dispatchMs += p.dispatchMs() / iterations;
                            res.expertMs += p.expertMs() / iterations;
                            res.combineMs += p.combineMs() / iterations;
                            res.totalMs += total / 1e6 / iterations;
                        }
                    }
                    moe.clear();
                    ex.close();
                    return res;
                }));
            }
            List<Result> results = new ArrayList<>();
            for (Future<Result> f : fs) {
                results.add(f.get(30, TimeUnit.MINUTES));
            }
            return results.get(0);
        } finally {
            pool.shutdownNow();
        }
    }

    public static void main(String[] args) throws Exception {
        int[] a = {512, 1024, 8, 2, 2, 1024, 10};
        for (int i = 0; i < args.length && i < a.length; i++) {
            a[i] = Integer.parseInt(args[i]);
        }
        String mode = args.length > 7 ? args[7] : "native";
        Result r;
        if ("native".equals(mode)) {
            EpConfig cfg = EpConfig.builder().bufferSizeGb(0.25).timeout(Duration.ofMinutes(5)).build();
            try (EpGroup group = EpGroup.inProcess(a[4])) {
                r = run(a[0], a[1], a[2], a[3], a[4], a[5], a[6],
                        rank -> new EpBufferExchange(group.buffer(rank, cfg), true));
            }
        } else if ("java".equals(mode)) {
            JavaExchangeGroup group = new JavaExchangeGroup(a[4], Duration.ofMinutes(5));
            r = run(a[0], a[1], a[2], a[3], a[4], a[5], a[6], group::rank);
        } else {
            throw new IllegalArgumentException("exchange=" + mode + ": must be native or java");
        }
        System.out.printf("MoE layer on CPU, fp32, %s exchange: hidden %d, ffn %d, %d experts, top-%d, %d ranks (threads),"
                + " %d tokens per rank, %d iterations, %d cores%n", mode, a[0], a[1], a[2], a[3], a[4], a[5], a[6],
                Runtime.getRuntime().availableProcessors());
        System.out.println("rank 0: " + r);
    }
}

package org.deepep4j.moe;

import java.util.ArrayList;
import java.util.List;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.Future;
import java.util.concurrent.TimeUnit;
import java.util.function.IntFunction;

/** Runs one task per rank on its own thread (collective calls need all ranks at once) and returns their results. */
final class Ranks {

    private Ranks() {
    }

    static <T> List<T> run(int ranks, IntFunction<T> task) {
        ExecutorService pool = Executors.newFixedThreadPool(ranks);
        try {
            List<Future<T>> fs = new ArrayList<>();
            for (int r = 0; r < ranks; r++) {
                final int rank = r;
                fs.add(pool.submit(() -> task.apply(rank)));
            }
            List<T> out = new ArrayList<>();
            for (Future<T> f : fs) {
                out.add(f.get(120, TimeUnit.SECONDS));
            }
            return out;
        } catch (Exception e) {
            throw new AssertionError("a rank failed: " + e, e);
        } finally {
            pool.shutdownNow();
        }
    }
}

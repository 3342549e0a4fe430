package org.deepep4j.examples;

import java.time.Duration;
import java.util.ArrayList;
import java.util.List;
import java.util.concurrent.ExecutionException;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.Future;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.TimeoutException;

/**
 * One thread per in-process rank, kept for the object's lifetime so rank r always runs on the same thread (buffers
 * created on it are used from it). {@link #run} runs a body on every rank at once and waits for all of them.
 */
public final class RankThreads implements AutoCloseable {
    /** Work of one rank; may throw. */
    @FunctionalInterface
    public interface RankBody<T> {
        T run(int rank) throws Exception;
    }

    private final ExecutorService[] threads;

    public RankThreads(int ranks) {
        if (ranks < 1) throw new IllegalArgumentException("ranks " + ranks + " must be >= 1");
        threads = new ExecutorService[ranks];
        for (int r = 0; r < ranks; r++) {
            String name = "ep-rank-" + r;
            threads[r] = Executors.newSingleThreadExecutor(task -> {
                Thread t = new Thread(task, name);
                t.setDaemon(true);
                return t;
            });
        }
    }

    public int size() {
        return threads.length;
    }

    /**
     * Runs {@code body} on every rank concurrently and returns the results by rank. Waits for all ranks (at most
     * {@code timeout} in total), then throws the first failure, so that the other ranks' errors have surfaced too.
     */
    public <T> List<T> run(Duration timeout, RankBody<T> body) throws Exception {
        List<Future<T>> futures = new ArrayList<>();
        for (int r = 0; r < threads.length; r++) {
            int rank = r;
            futures.add(threads[r].submit(() -> body.run(rank)));
        }
        long deadline = System.nanoTime() + timeout.toNanos();
        List<T> results = new ArrayList<>();
        Exception first = null;
        for (int r = 0; r < futures.size(); r++) {
            try {
                results.add(futures.get(r).get(Math.max(1, deadline - System.nanoTime()), TimeUnit.NANOSECONDS));
            } catch (ExecutionException e) {
                results.add(null);
                if (first == null) first = e.getCause() instanceof Exception ex ? ex : e;
            } catch (TimeoutException e) {
                results.add(null);
                if (first == null) {
                    first = new IllegalStateException("rank " + r + " did not finish within " + timeout.toSeconds() + " s", e);
                }
            }
        }
        if (first != null) throw first;
        return results;
    }

    @Override
    public void close() {
        for (ExecutorService t : threads) t.shutdownNow();
    }
}

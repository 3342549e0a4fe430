package org.deepep4j.examples;

import java.util.List;
import java.util.Map;
import java.util.concurrent.ConcurrentHashMap;
import org.nd4j.linalg.dataset.DataSet;
import org.nd4j.linalg.dataset.api.DataSetPreProcessor;
import org.nd4j.linalg.dataset.api.iterator.DataSetIterator;

/**
 * The {@link TaskMixture} batches of a run as a DL4J iterator, generated as they are asked for. The expert-parallel
 * trainer deals batches round-robin (round s of an epoch: the next R batches, rank r takes the r-th), so the n-th batch
 * of the run is {@code TaskMixture.batch(n % R, n / R, tokens)}: the batch rank r sees at global step n / R. Each
 * batch's task ids are kept until {@link #takeTasks} collects them.
 */
final class TaskMixtureIterator implements DataSetIterator {
    private final TaskMixture data;
    private final int ranks;
    private final int batchesPerEpoch;
    private final int tokens;
    private final Map<Long, int[]> tasks = new ConcurrentHashMap<>();
    private long served;
    private int servedThisEpoch;
    private DataSetPreProcessor preProcessor;

    TaskMixtureIterator(TaskMixture data, Options o) {
        this.data = data;
        this.ranks = o.ranks;
        this.batchesPerEpoch = o.stepsPerEpoch * o.ranks;
        this.tokens = o.tokensPerRank;
    }

    /** Task id of every token of the batch rank {@code rank} trained on at global step {@code step}; once. */
    int[] takeTasks(long step, int rank) {
        int[] t = tasks.remove(step * ranks + rank);
        if (t == null) throw new IllegalStateException("no batch of step " + step + " for rank " + rank);
        return t;
    }

    @Override
    public synchronized boolean hasNext() {
        return servedThisEpoch < batchesPerEpoch;
    }

    @Override
    public synchronized DataSet next() {
        if (!hasNext()) throw new java.util.NoSuchElementException("epoch has " + batchesPerEpoch + " batches");
        long n = served++;
        servedThisEpoch++;
        TaskMixture.Batch b = data.batch((int) (n % ranks), n / ranks, tokens);
        tasks.put(n, b.task());
        DataSet ds = new DataSet(b.x(), b.y());
        if (preProcessor != null) preProcessor.preProcess(ds);
        return ds;
    }

    @Override
    public DataSet next(int num) {
        throw new UnsupportedOperationException("batches have a fixed size of " + tokens + " tokens");
    }

    @Override
    public synchronized void reset() {
        // A new epoch continues the global step count: every epoch sees new batches.
        servedThisEpoch = 0;
    }

    @Override
    public boolean resetSupported() {
        return true;
    }

    @Override
    public boolean asyncSupported() {
        return false;
    }

    @Override
    public int inputColumns() {
        return data.hidden();
    }

    @Override
    public int totalOutcomes() {
        return data.hidden();
    }

    @Override
    public int batch() {
        return tokens;
    }

    @Override
    public void setPreProcessor(DataSetPreProcessor preProcessor) {
        this.preProcessor = preProcessor;
    }

    @Override
    public DataSetPreProcessor getPreProcessor() {
        return preProcessor;
    }

    @Override
    public List<String> getLabels() {
        return null;
    }
}

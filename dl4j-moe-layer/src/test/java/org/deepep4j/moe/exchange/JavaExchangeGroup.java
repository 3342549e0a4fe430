package org.deepep4j.moe.exchange;

import org.nd4j.linalg.api.ndarray.INDArray;
import org.nd4j.linalg.factory.Nd4j;

import java.time.Duration;
import java.util.ArrayList;
import java.util.List;
import java.util.concurrent.BrokenBarrierException;
import java.util.concurrent.CyclicBarrier;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.TimeoutException;

/**
 * The tests' oracle: expert exchange for R ranks that are threads of this JVM, in plain ND4J. Each rank publishes its
 * arrays in a shared slot, the ranks meet at a barrier, and each reads what it needs from the others. It works for
 * every floating data type (double included, which the gradient checks need) and is what the engine's path is
 * compared with. Training itself always goes through the engine.
 */
public final class JavaExchangeGroup {

    private final int size;
    private final Duration timeout;
    private final CyclicBarrier barrier;
    private final Object[][] slots;
    private final Rank[] ranks;

    public JavaExchangeGroup(int size, Duration timeout) {
        if (size < 1) {
            throw new IllegalArgumentException("JavaExchangeGroup size=" + size + ": must be >= 1");
        }
        if (timeout == null || timeout.isNegative() || timeout.isZero()) {
            throw new IllegalArgumentException("JavaExchangeGroup timeout=" + timeout + ": must be > 0");
        }
        this.size = size;
        this.timeout = timeout;
        this.barrier = new CyclicBarrier(size);
        this.slots = new Object[size][];
        this.ranks = new Rank[size];
        for (int r = 0; r < size; r++) {
            ranks[r] = new Rank(r);
        }
    }

    public int size() {
        return size;
    }

    public ExpertExchange rank(int r) {
        if (r < 0 || r >= size) {
            throw new IllegalArgumentException("rank=" + r + ": must be in [0, " + size + ")");
        }
        return ranks[r];
    }

    private void sync(int rank, String op) {
        try {
            barrier.await(timeout.toMillis(), TimeUnit.MILLISECONDS);
        } catch (TimeoutException e) {
            throw new IllegalStateException("in-process exchange rank " + rank + ": " + op + " waited more than "
                    + timeout + " for the other ranks", e);
        } catch (BrokenBarrierException e) {
            throw new IllegalStateException("in-process exchange rank " + rank + ": " + op
                    + " aborted because another rank failed or timed out", e);
        } catch (InterruptedException e) {
            Thread.currentThread().interrupt();
            throw new IllegalStateException("in-process exchange rank " + rank + ": " + op + " interrupted", e);
        }
    }

    /** What a receiving rank remembers of a dispatch: per source rank, the source tokens in receive order. */
    private static final class Layout {
        final int[][] tokensFrom;
        final int[] offsetFrom;
        final int numTokens;
        final int topK;

        Layout(int[][] tokensFrom, int numTokens, int topK) {
            this.tokensFrom = tokensFrom;
            this.numTokens = numTokens;
            this.topK = topK;
            this.offsetFrom = new int[tokensFrom.length];
            for (int s = 1; s < tokensFrom.length; s++) {
                offsetFrom[s] = offsetFrom[s - 1] + tokensFrom[s - 1].length;
            }
        }
    }

    private final class Rank implements ExpertExchange {
        private final int rank;

        Rank(int rank) {
            this.rank = rank;
        }

        @Override
        public int rank() {
            return rank;
        }

        @Override
        public int numRanks() {
            return size;
        }

        @Override
        public Dispatched dispatch(INDArray x, INDArray topkIdx, INDArray topkWeights, int numExperts) {
            if (numExperts % size != 0) {
                throw new IllegalArgumentException("numExperts=" + numExperts + ": must be divisible by the number of ranks "
                        + size);
            }
            int k = (int) topkIdx.size(1);
            slots[rank] = new Object[]{x, topkIdx.dup().data().asLong(), topkWeights.dup().data().asDouble(), k};
            sync(rank, "dispatch");
            int perRank = numExperts / size;
            long lo = (long) rank * perRank;
            long hi = lo + perRank;
            int[][] tokensFrom = new int[size][];
            List<INDArray> parts = new ArrayList<>();
            List<long[]> idxRows = new ArrayList<>();
            List<double[]> wRows = new ArrayList<>();
            int[] perExpert = new int[perRank];
            for (int s = 0; s < size; s++) {
                Object[] in = slots[s];
                long[] idx = (long[]) in[1];
                double[] w = (double[]) in[2];
                int ks = (Integer) in[3];
                if (ks != k) {
                    throw new IllegalArgumentException("topkIdx columns=" + k + " on rank " + rank + " but " + ks
                            + " on rank " + s + ": every rank must use the same K");
                }
                int n = idx.length / k;
                int[] picked = new int[n];
                int count = 0;
                for (int t = 0; t < n; t++) {
                    long[] localIdx = new long[k];
                    double[] localW = new double[k];
                    boolean mine = false;
                    for (int j = 0; j < k; j++) {
                        long e = idx[t * k + j];
                        if (e < -1 || e >= numExperts) {
                            throw new IllegalArgumentException("topkIdx[" + t + "," + j + "]=" + e + " on rank " + s
                                    + ": must be -1 or in [0, " + numExperts + ")");
                        }
                        if (e >= lo && e < hi) {
                            mine = true;
                            localIdx[j] = e - lo;
                            localW[j] = w[t * k + j];
                            perExpert[(int) (e - lo)]++;
                        } else {
                            localIdx[j] = -1;
                        }
                    }
                    if (mine) {
                        picked[count++] = t;
                        idxRows.add(localIdx);
                        wRows.add(localW);
                    }
                }
                tokensFrom[s] = java.util.Arrays.copyOf(picked, count);
                if (count > 0) {
                    parts.add(Nd4j.pullRows((INDArray) in[0], 1, tokensFrom[s]));
                }
            }
            long h = x.size(1);
            INDArray recvX = parts.isEmpty() ? Nd4j.create(x.dataType(), 0, h)
                    : parts.size() == 1 ? parts.get(0) : Nd4j.vstack(parts.toArray(new INDArray[0]));
            int m = idxRows.size();
            long[] flatIdx = new long[m * k];
            double[] flatW = new double[m * k];
            for (int i = 0; i < m; i++) {
                System.arraycopy(idxRows.get(i), 0, flatIdx, i * k, k);
                System.arraycopy(wRows.get(i), 0, flatW, i * k, k);
            }
            INDArray recvIdx = Nd4j.createFromArray(flatIdx).reshape(m, k);
            INDArray recvW = Nd4j.createFromArray(flatW).reshape(m, k).castTo(topkWeights.dataType());
            sync(rank, "dispatch");
            return new Routed(recvX, recvIdx, recvW, perExpert, new Layout(tokensFrom, (int) x.size(0), k));
        }

        /** One dispatch of this rank: what it received and the layout combine and cached dispatch reuse. */
        private final class Routed implements Dispatched {
            private final INDArray recvX;
            private final INDArray recvIdx;
            private final INDArray recvW;
            private final int[] perExpert;
            private final Layout layout;

            Routed(INDArray recvX, INDArray recvIdx, INDArray recvW, int[] perExpert, Layout layout) {
                this.recvX = recvX;
                this.recvIdx = recvIdx;
                this.recvW = recvW;
                this.perExpert = perExpert;
                this.layout = layout;
            }

            @Override
            public INDArray recvX() {
                return recvX;
            }

            @Override
            public INDArray recvTopkIdx() {
                return recvIdx;
            }

            @Override
            public INDArray recvTopkWeights() {
                return recvW;
            }

            @Override
            public int[] recvTokensPerExpert() {
                return perExpert.clone();
            }

            @Override
            public Combined combine(INDArray y, INDArray yTopkWeights) {
                return Rank.this.combine(layout, y, yTopkWeights);
            }

            @Override
            public INDArray dispatchCached(INDArray g) {
                return Rank.this.dispatchCached(layout, g);
            }

            @Override
            public void close() {
            }
        }

        private Combined combine(Layout mine, INDArray y, INDArray yTopkWeights) {
            slots[rank] = new Object[]{y, mine, yTopkWeights == null ? null
                    : yTopkWeights.dup().data().asDouble()};
            sync(rank, "combine");
            int n = mine.numTokens;
            int k = mine.topK;
            INDArray out = Nd4j.zeros(y.dataType(), n, y.size(1));
            double[] outW = yTopkWeights == null ? null : new double[n * k];
            INDArray zeroRow = Nd4j.zeros(y.dataType(), 1, y.size(1));
            for (int s = 0; s < size; s++) {
                Object[] in = slots[s];
                Layout theirs = (Layout) in[1];
                int[] tokens = theirs.tokensFrom[rank];
                if (tokens.length == 0) {
                    continue;
                }
                int[] rows = new int[tokens.length];
                for (int i = 0; i < tokens.length; i++) {
                    rows[i] = theirs.offsetFrom[rank] + i;
                }
                // Place the returned rows at their tokens' positions (a zero row elsewhere) and add.
                INDArray padded = Nd4j.vstack(Nd4j.pullRows((INDArray) in[0], 1, rows), zeroRow);
                int[] where = new int[n];
                java.util.Arrays.fill(where, tokens.length);
                for (int i = 0; i < tokens.length; i++) {
                    where[tokens[i]] = i;
                }
                out.addi(Nd4j.pullRows(padded, 1, where));
                if (outW != null) {
                    double[] w = (double[]) in[2];
                    if (w == null) {
                        throw new IllegalArgumentException("yTopkWeights=null on rank " + s + " but given on rank "
                                + rank + ": all ranks must pass it or none");
                    }
                    for (int i = 0; i < tokens.length; i++) {
                        for (int j = 0; j < k; j++) {
                            outW[tokens[i] * k + j] += w[rows[i] * k + j];
                        }
                    }
                }
            }
            sync(rank, "combine");
            INDArray ow = outW == null ? null
                    : Nd4j.createFromArray(outW).reshape(n, k).castTo(yTopkWeights.dataType());
            return new Combined(out, ow);
        }

        private INDArray dispatchCached(Layout mine, INDArray g) {
            if (g.size(0) != mine.numTokens) {
                throw new IllegalArgumentException("g rows=" + g.size(0) + ": must equal the dispatched token count "
                        + mine.numTokens);
            }
            slots[rank] = new Object[]{g};
            sync(rank, "cached dispatch");
            List<INDArray> parts = new ArrayList<>();
            for (int s = 0; s < size; s++) {
                if (mine.tokensFrom[s].length > 0) {
                    parts.add(Nd4j.pullRows((INDArray) slots[s][0], 1, mine.tokensFrom[s]));
                }
            }
            INDArray recv = parts.isEmpty() ? Nd4j.create(g.dataType(), 0, g.size(1))
                    : parts.size() == 1 ? parts.get(0) : Nd4j.vstack(parts.toArray(new INDArray[0]));
            sync(rank, "cached dispatch");
            return recv;
        }
    }
}

package org.deepep4j.moe.layers;

import org.deepep4j.moe.conf.MoELayer;
import org.deepep4j.moe.conf.ScoreFunction;
import org.nd4j.linalg.api.ndarray.INDArray;
import org.nd4j.linalg.factory.Nd4j;

/**
 * Router of a MoE layer: scores = softmax|sigmoid(x Wr); the top-k experts by (score + selection bias) are chosen and
 * weighted by their scores (optionally renormalised to sum 1). The bias only steers selection, as in aux-loss-free
 * balancing, so it gets no loss gradient. Work on [N, E] is done on the host: E is small and top-k is sequential.
 */
final class Router {

    final INDArray x;
    final int n;
    final int e;
    final int k;
    /** [N*E] scores, row-major. */
    final double[] scores;
    /** [N*K] chosen global expert ids. */
    final long[] topkIdx;
    /** [N*K] chosen scores before renormalisation. */
    final double[] gate;
    /** [N*K] routing weights. */
    final double[] weights;
    /** [N] sum of the chosen scores (renormalisation only). */
    final double[] gateSum;
    /** Tokens per expert. */
    final int[] load;
    final double auxLoss;
    private final MoELayer conf;

    /**
     * @param replayIdx recorded [N, K] choices to reuse instead of a fresh top-k, or null
     * @param where     the layer and rank, for errors ("MoELayer 'moe' (layer 1) on rank 0")
     * @param timeSteps T of a [mb, nIn, T] input (row b*T + t is example b, step t), 0 for [mb, nIn]
     */
    Router(MoELayer conf, INDArray x, INDArray wr, INDArray br, INDArray replayIdx, String where, long timeSteps) {
        this.conf = conf;
        this.x = x;
        n = (int) x.size(0);
        e = conf.getNumExperts();
        k = conf.getTopK();
        scores = x.mmul(wr).castTo(org.nd4j.linalg.api.buffer.DataType.DOUBLE).dup('c').data().asDouble();
        checkFinite(scores, wr, where, timeSteps);
        score(scores);
        double[] bias = br.castTo(org.nd4j.linalg.api.buffer.DataType.DOUBLE).dup('c').data().asDouble();
        topkIdx = replayIdx != null ? checkedReplay(replayIdx) : topK(scores, bias);
        gate = new double[n * k];
        weights = new double[n * k];
        gateSum = new double[n];
        load = new int[e];
        for (int t = 0; t < n; t++) {
            double sum = 0;
            for (int j = 0; j < k; j++) {
                int ex = (int) topkIdx[t * k + j];
                gate[t * k + j] = scores[t * e + ex];
                sum += gate[t * k + j];
                load[ex]++;
            }
            gateSum[t] = sum;
            for (int j = 0; j < k; j++) {
                weights[t * k + j] = conf.isNormalizeTopK() ? gate[t * k + j] / sum : gate[t * k + j];
            }
        }
        auxLoss = conf.getAuxLossCoefficient() > 0 ? auxLoss() : 0.0;
    }

    /**
     * A NaN or infinity in an input row makes that row's logits non-finite, and top-k cannot choose from them: fail
     * naming the first such row and why, instead of routing garbage (checking the [N, E] logits costs nothing).
     */
    private void checkFinite(double[] logits, INDArray wr, String where, long timeSteps) {
        int bad = -1;
        for (int i = 0; i < logits.length && bad < 0; i++) {
            if (!Double.isFinite(logits[i])) {
                bad = i / e;
            }
        }
        if (bad >= 0) {
            throw nonFinite(x, bad, wr, where, timeSteps, true);
        }
    }

    /**
     * The same rule where the router runs in the engine (which would route a NaN row anywhere): one reduction over x
     * and Wr when they are finite (the usual case), a search for the first bad row only when the sum is not.
     */
    static void checkFiniteInput(INDArray x, INDArray wr, String where, long timeSteps) {
        if (Double.isFinite(x.sumNumber().doubleValue()) && Double.isFinite(wr.sumNumber().doubleValue())) {
            return;
        }
        if (x.size(0) == 0) {
            return;
        }
        double[] rowSums = x.sum(1).castTo(org.nd4j.linalg.api.buffer.DataType.DOUBLE).dup('c').data().asDouble();
        for (int r = 0; r < rowSums.length; r++) {
            if (!Double.isFinite(rowSums[r])) {
                IllegalArgumentException e = nonFinite(x, r, wr, where, timeSteps, false);
                if (e != null) {
                    throw e;
                }
            }
        }
        if (wr.isNaN().any() || wr.isInfinite().any()) {
            throw nonFinite(x, 0, wr, where, timeSteps, true);
        }
    }

    /**
     * The error for row {@code bad}: its first NaN / infinite column, else (when {@code orWeights}) the router
     * weights or an overflow; null when the row is finite and {@code orWeights} is false (a sum that overflowed).
     */
    private static IllegalArgumentException nonFinite(INDArray x, int bad, INDArray wr, String where, long timeSteps,
                                                      boolean orWeights) {
        long n = x.size(0);
        String row = timeSteps > 0 ? "input token " + bad + " (example " + bad / timeSteps + ", time step "
                + bad % timeSteps + ")" : "input row " + bad;
        double[] v = x.getRow(bad).castTo(org.nd4j.linalg.api.buffer.DataType.DOUBLE).dup('c').data().asDouble();
        String why = null;
        for (int c = 0; c < v.length && why == null; c++) {
            if (Double.isNaN(v[c])) {
                why = row + " of " + n + " has NaN at column " + c;
            } else if (Double.isInfinite(v[c])) {
                why = row + " of " + n + " has " + v[c] + " at column " + c;
            }
        }
        if (why == null && !orWeights) {
            return null;
        }
        if (why == null) {
            why = wr.isNaN().any() || wr.isInfinite().any()
                    ? "the router weights Wr contain NaN or infinity (first affected: " + row + ")"
                    : "the router logits of " + row + " overflow";
        }
        return new IllegalArgumentException(where + ": " + why + "; the router needs finite values to choose experts"
                + " (NaN usually means diverged training, e.g. a learning rate too high, or bad data)");
    }

    private void score(double[] s) {
        if (conf.getScoreFunction() == ScoreFunction.SIGMOID) {
            for (int i = 0; i < s.length; i++) {
                s[i] = 1.0 / (1.0 + Math.exp(-s[i]));
            }
            return;
        }
        for (int t = 0; t < n; t++) {
            double max = Double.NEGATIVE_INFINITY;
            for (int j = 0; j < e; j++) {
                max = Math.max(max, s[t * e + j]);
            }
            double sum = 0;
            for (int j = 0; j < e; j++) {
                s[t * e + j] = Math.exp(s[t * e + j] - max);
                sum += s[t * e + j];
            }
            for (int j = 0; j < e; j++) {
                s[t * e + j] /= sum;
            }
        }
    }

    private long[] topK(double[] s, double[] bias) {
        long[] idx = new long[n * k];
        boolean[] taken = new boolean[e];
        for (int t = 0; t < n; t++) {
            java.util.Arrays.fill(taken, false);
            for (int j = 0; j < k; j++) {
                int best = -1;
                double bestV = Double.NEGATIVE_INFINITY;
                for (int c = 0; c < e; c++) {
                    double v = s[t * e + c] + bias[c];
                    if (!taken[c] && v > bestV) {
                        best = c;
                        bestV = v;
                    }
                }
                taken[best] = true;
                idx[t * k + j] = best;
            }
        }
        return idx;
    }

    private long[] checkedReplay(INDArray replay) {
        if (replay.rank() != 2 || replay.size(0) != n || replay.size(1) != k) {
            throw new IllegalStateException("routing replay: recorded routing has shape "
                    + java.util.Arrays.toString(replay.shape()) + " but this forward has " + n + " tokens and topK=" + k
                    + "; replay requires the same tokens as the recorded forward (clear the replay to route afresh)");
        }
        long[] idx = replay.dup('c').data().asLong();
        for (int i = 0; i < idx.length; i++) {
            if (idx[i] < 0 || idx[i] >= e) {
                throw new IllegalStateException("routing replay: recorded expert id " + idx[i] + " at token " + i / k
                        + ": must be in [0, numExperts=" + e + ")");
            }
        }
        return idx;
    }

    /** Switch-style balance loss coef * E * sum_e f_e P_e; f = share of assignments, P = mean score. */
    private double auxLoss() {
        double total = 0;
        for (int c = 0; c < e; c++) {
            double p = 0;
            for (int t = 0; t < n; t++) {
                p += scores[t * e + c];
            }
            total += (load[c] / (double) (n * k)) * (p / n);
        }
        return conf.getAuxLossCoefficient() * e * total;
    }

    INDArray topkIdxArray() {
        return Nd4j.createFromArray(topkIdx).reshape(n, k);
    }

    /**
     * [N, K] routing weights as FLOAT, the engine's type, which the exchange and the experts use as they are (DOUBLE in
     * a double-precision network, which keeps gradient checks exact).
     */
    INDArray weightsArray() {
        if (x.dataType() == org.nd4j.linalg.api.buffer.DataType.DOUBLE) {
            return Nd4j.createFromArray(weights).reshape(n, k);
        }
        float[] w = new float[weights.length];
        for (int i = 0; i < w.length; i++) {
            w[i] = (float) weights[i];
        }
        return Nd4j.createFromArray(w).reshape(n, k);
    }

    /**
     * Backward: from the gradient of the routing weights [N*K] (and the aux loss, scaled by {@code auxScale}, DL4J's
     * minibatch size, because DL4J divides every gradient by it later) to {gx, gWr}.
     */
    INDArray[] backward(double[] gWeights, INDArray wr, double auxScale) {
        double[] gScores = new double[n * e];
        for (int t = 0; t < n; t++) {
            double dot = 0;
            for (int j = 0; j < k; j++) {
                dot += gWeights[t * k + j] * weights[t * k + j];
            }
            for (int j = 0; j < k; j++) {
                double gGate = conf.isNormalizeTopK() ? (gWeights[t * k + j] - dot) / gateSum[t] : gWeights[t * k + j];
                gScores[t * e + (int) topkIdx[t * k + j]] += gGate;
            }
        }
        if (conf.getAuxLossCoefficient() > 0) {
            for (int c = 0; c < e; c++) {
                double g = auxScale * conf.getAuxLossCoefficient() * e * (load[c] / (double) (n * k)) / n;
                for (int t = 0; t < n; t++) {
                    gScores[t * e + c] += g;
                }
            }
        }
        double[] gLogits = new double[n * e];
        for (int t = 0; t < n; t++) {
            if (conf.getScoreFunction() == ScoreFunction.SIGMOID) {
                for (int c = 0; c < e; c++) {
                    double s = scores[t * e + c];
                    gLogits[t * e + c] = gScores[t * e + c] * s * (1 - s);
                }
            } else {
                double dot = 0;
                for (int c = 0; c < e; c++) {
                    dot += gScores[t * e + c] * scores[t * e + c];
                }
                for (int c = 0; c < e; c++) {
                    gLogits[t * e + c] = scores[t * e + c] * (gScores[t * e + c] - dot);
                }
            }
        }
        INDArray gl = Nd4j.createFromArray(gLogits).reshape(n, e).castTo(x.dataType());
        return new INDArray[]{gl.mmul(wr.transpose()), x.transpose().mmul(gl)};
    }

    /** Aux-loss-free balancing step for the selection bias, as a value DL4J subtracts: -rate * sign(mean - load). */
    double[] biasStep(double rate) {
        double mean = n * (double) k / e;
        double[] step = new double[e];
        for (int c = 0; c < e; c++) {
            step[c] = -rate * Math.signum(mean - load[c]);
        }
        return step;
    }
}

package org.deepep4j.examples;

import org.nd4j.linalg.api.buffer.DataType;
import org.nd4j.linalg.api.ndarray.INDArray;
import org.nd4j.linalg.factory.Nd4j;

/**
 * The gate: logits = x Wg, softmax over experts, each token's top-k experts with their probabilities as weights. Its
 * backward turns the gradient of those weights (plus a load-balancing term) into the gradient of Wg.
 */
public final class Router {
    /** Forward result of one batch; kept for the backward pass. */
    public record Routing(INDArray x, float[] probs, long[] topkIdx, float[] topkWeights, int tokens, int topK) {
        public INDArray topkIdxArray() {
            return Nd4j.create(topkIdx, new long[] {tokens, topK}, DataType.LONG);
        }

        public INDArray topkWeightsArray() {
            return Nd4j.create(topkWeights, new long[] {tokens, topK}, DataType.FLOAT);
        }
    }

    private final int experts;
    private final int topK;
    private final double balanceCoef;

    public Router(int experts, int topK, double balanceCoef) {
        if (topK < 1 || topK > experts) {
            throw new IllegalArgumentException("topK " + topK + " must be in 1.." + experts + " (the number of experts)");
        }
        this.experts = experts;
        this.topK = topK;
        this.balanceCoef = balanceCoef;
    }

    public Routing forward(INDArray x, INDArray gate) {
        int n = (int) x.size(0);
        float[] logits = x.mmul(gate).data().asFloat();
        float[] probs = new float[n * experts];
        long[] idx = new long[n * topK];
        float[] w = new float[n * topK];
        for (int t = 0; t < n; t++) {
            int o = t * experts;
            float max = Float.NEGATIVE_INFINITY;
            for (int e = 0; e < experts; e++) max = Math.max(max, logits[o + e]);
            double sum = 0;
            for (int e = 0; e < experts; e++) sum += probs[o + e] = (float) Math.exp(logits[o + e] - max);
            for (int e = 0; e < experts; e++) probs[o + e] /= (float) sum;
            // Top-k by repeated selection: k and E are small, and ties go to the lower expert id (deterministic).
            boolean[] taken = new boolean[experts];
            for (int k = 0; k < topK; k++) {
                int best = -1;
                for (int e = 0; e < experts; e++) {
                    if (!taken[e] && (best < 0 || probs[o + e] > probs[o + best])) best = e;
                }
                taken[best] = true;
                idx[t * topK + k] = best;
                w[t * topK + k] = probs[o + best];
            }
        }
        return new Routing(x, probs, idx, w, n, topK);
    }

    /**
     * Gradient of Wg from the gradient of the top-k weights {@code gradWeights[N*K]}. Adds the Switch-Transformer balance
     * loss coef * E * sum_e f_e * P_e (f_e: share of assignments to expert e, P_e: mean probability of e), which keeps the
     * router from sending every token to the same few experts.
     */
    public INDArray backward(Routing r, float[] gradWeights) {
        int n = r.tokens();
        float[] share = new float[experts];
        for (long e : r.topkIdx()) share[(int) e] += 1f / (n * topK);
        float[] gradLogits = new float[n * experts];
        for (int t = 0; t < n; t++) {
            int o = t * experts;
            float[] gradProbs = new float[experts];
            for (int e = 0; e < experts; e++) gradProbs[e] = (float) (balanceCoef * experts * share[e] / n);
            for (int k = 0; k < topK; k++) gradProbs[(int) r.topkIdx()[t * topK + k]] += gradWeights[t * topK + k];
            // Softmax backward: dL/dlogit_j = p_j * (dL/dp_j - sum_i p_i dL/dp_i).
            double dot = 0;
            for (int e = 0; e < experts; e++) dot += r.probs()[o + e] * gradProbs[e];
            for (int e = 0; e < experts; e++) gradLogits[o + e] = (float) (r.probs()[o + e] * (gradProbs[e] - dot));
        }
        INDArray g = Nd4j.create(gradLogits, new long[] {n, experts}, DataType.FLOAT);
        return r.x().transpose().mmul(g);
    }

    /** The balance loss of a routing, for reporting; the same formula {@link #backward} differentiates. */
    public double balanceLoss(Routing r) {
        int n = r.tokens();
        double[] share = new double[experts];
        double[] meanProb = new double[experts];
        for (long e : r.topkIdx()) share[(int) e] += 1.0 / (n * topK);
        for (int t = 0; t < n; t++) {
            for (int e = 0; e < experts; e++) meanProb[e] += r.probs()[t * experts + e] / n;
        }
        double loss = 0;
        for (int e = 0; e < experts; e++) loss += share[e] * meanProb[e];
        return balanceCoef * experts * loss;
    }
}

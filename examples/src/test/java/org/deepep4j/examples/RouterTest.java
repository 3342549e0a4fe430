package org.deepep4j.examples;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;

import java.util.SplittableRandom;
import org.junit.jupiter.api.Test;
import org.nd4j.linalg.api.buffer.DataType;
import org.nd4j.linalg.api.ndarray.INDArray;
import org.nd4j.linalg.factory.Nd4j;

class RouterTest {
    @Test
    void picksTopKByProbabilityWithWeightsThatAreSoftmaxProbabilities() {
        Router router = new Router(4, 2, 0.0);
        INDArray x = Nd4j.create(new float[] {1, 0}, new long[] {1, 2}, DataType.FLOAT);
        // logits = x * gate = first row of gate = [0, 2, 1, -1]
        INDArray gate = Nd4j.create(new float[] {0, 2, 1, -1, 5, 5, 5, 5}, new long[] {2, 4}, DataType.FLOAT);
        Router.Routing r = router.forward(x, gate);
        assertArrayEquals(new long[] {1, 2}, r.topkIdx());
        double z = Math.exp(0) + Math.exp(2) + Math.exp(1) + Math.exp(-1);
        assertEquals(Math.exp(2) / z, r.topkWeights()[0], 1e-6);
        assertEquals(Math.exp(1) / z, r.topkWeights()[1], 1e-6);
    }

    @Test
    void rejectsTopKAboveExperts() {
        IllegalArgumentException e = assertThrows(IllegalArgumentException.class, () -> new Router(4, 5, 0));
        assertEquals("topK 5 must be in 1..4 (the number of experts)", e.getMessage());
    }

    @Test
    void gateGradientMatchesFiniteDifferences() {
        int n = 6, h = 3, experts = 5, k = 2;
        Router router = new Router(experts, k, 0.05);
        SplittableRandom rnd = new SplittableRandom(7);
        INDArray x = random(rnd, n, h);
        INDArray gate = random(rnd, h, experts);
        float[] c = new float[n * k];
        for (int i = 0; i < c.length; i++) c[i] = (float) rnd.nextDouble(-1, 1);

        INDArray analytic = router.backward(router.forward(x, gate), c);
        double eps = 1e-2;
        for (int i = 0; i < h; i++) {
            for (int e = 0; e < experts; e++) {
                double base = gate.getDouble(i, e);
                gate.putScalar(i, e, base + eps);
                double up = loss(router, x, gate, c);
                gate.putScalar(i, e, base - eps);
                double down = loss(router, x, gate, c);
                gate.putScalar(i, e, base);
                assertEquals((up - down) / (2 * eps), analytic.getDouble(i, e), 2e-3, "dL/dgate[" + i + "," + e + "]");
            }
        }
    }

    /** sum_k c_k * w_k + balance loss, with the top-k choice held (eps is small enough not to change it). */
    private static double loss(Router router, INDArray x, INDArray gate, float[] c) {
        Router.Routing r = router.forward(x, gate);
        double l = 0;
        for (int i = 0; i < c.length; i++) l += c[i] * r.topkWeights()[i];
        return l + router.balanceLoss(r);
    }

    static INDArray random(SplittableRandom rnd, int rows, int cols) {
        float[] a = new float[rows * cols];
        for (int i = 0; i < a.length; i++) a[i] = (float) rnd.nextDouble(-1, 1);
        return Nd4j.create(a, new long[] {rows, cols}, DataType.FLOAT);
    }
}

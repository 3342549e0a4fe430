package org.deepep4j.examples;

import static org.junit.jupiter.api.Assertions.assertEquals;

import java.util.SplittableRandom;
import org.junit.jupiter.api.Test;
import org.nd4j.linalg.api.buffer.DataType;
import org.nd4j.linalg.api.ndarray.INDArray;
import org.nd4j.linalg.factory.Nd4j;
import org.nd4j.linalg.ops.transforms.Transforms;

class ExpertShardTest {
    private static final int H = 3;
    private static final int F = 4;
    // Five received rows, two slots each; -1 marks a slot whose expert lives on another rank.
    private static final long[] IDS = {0, 1, 1, -1, -1, 0, 0, -1, 1, 0};
    private static final float[] W = {0.6f, 0.3f, 0.9f, 0.5f, 0.2f, 0.7f, 0.4f, 0.1f, 0.25f, 0.35f};

    @Test
    void outputIsWeightedSumOfLocalExpertsPerRow() {
        ExpertShard shard = new ExpertShard(0, 2, H, F, 3);
        INDArray x = RouterTest.random(new SplittableRandom(1), 5, H);
        INDArray y = shard.forward(x, ids(), weights());
        for (int row = 0; row < 5; row++) {
            INDArray expected = Nd4j.zeros(DataType.FLOAT, 1, H);
            for (int k = 0; k < 2; k++) {
                int e = (int) IDS[row * 2 + k];
                if (e < 0) continue;
                INDArray[] p = shard.params().get(e);
                INDArray o = Transforms.relu(x.getRow(row, true).mmul(p[0]).addRowVector(p[1])).mmul(p[2]).addRowVector(p[3]);
                expected.addi(o.mul(W[row * 2 + k]));
            }
            for (int h = 0; h < H; h++) assertEquals(expected.getDouble(0, h), y.getDouble(row, h), 1e-5);
        }
    }

    @Test
    void parameterArraysAreViewsOfTheFlatVector() {
        ExpertShard shard = new ExpertShard(0, 2, H, F, 3);
        long perExpert = H * F + F + F * H + H;
        assertEquals(2 * perExpert, shard.flatParams().length());
        shard.params().get(1)[2].putScalar(new long[] {1, 2}, 7.5);
        // Expert 1's W2 starts after expert 0 and expert 1's W1 and b1; element (1,2) of an [F,H] array is 1*H+2 further.
        assertEquals(7.5, shard.flatParams().getDouble(perExpert + H * F + F + H + 2));
        shard.flatParams().putScalar(0, -2.0);
        assertEquals(-2.0, shard.params().get(0)[0].getDouble(0, 0));
    }

    @Test
    void gradientsMatchFiniteDifferences() {
        ExpertShard shard = new ExpertShard(0, 2, H, F, 3);
        SplittableRandom rnd = new SplittableRandom(2);
        INDArray x = RouterTest.random(rnd, 5, H);
        INDArray c = RouterTest.random(rnd, 5, H);
        shard.forward(x, ids(), weights());
        float[] gradW = shard.backward(c);

        double eps = 1e-3;
        for (int e = 0; e < 2; e++) {
            for (int i = 0; i < 4; i++) {
                INDArray p = shard.params().get(e)[i];
                INDArray g = shard.grads().get(e)[i];
                for (long j = 0; j < p.length(); j++) {
                    double base = p.getDouble(j);
                    p.putScalar(j, base + eps);
                    double up = loss(shard, x, c, W);
                    p.putScalar(j, base - eps);
                    double down = loss(shard, x, c, W);
                    p.putScalar(j, base);
                    assertEquals((up - down) / (2 * eps), g.getDouble(j), 2e-3, "expert " + e + " param " + i + "[" + j + "]");
                }
            }
        }
        for (int s = 0; s < W.length; s++) {
            float[] w = W.clone();
            w[s] += eps;
            double up = loss(shard, x, c, w);
            w[s] -= 2 * eps;
            double down = loss(shard, x, c, w);
            assertEquals(IDS[s] < 0 ? 0 : (up - down) / (2 * eps), gradW[s], 2e-3, "slot weight " + s);
        }
    }

    private static double loss(ExpertShard shard, INDArray x, INDArray c, float[] w) {
        INDArray y = shard.forward(x, ids(), Nd4j.create(w, new long[] {5, 2}, DataType.FLOAT));
        return y.mul(c).sumNumber().doubleValue();
    }

    private static INDArray ids() {
        return Nd4j.create(IDS, new long[] {5, 2}, DataType.LONG);
    }

    private static INDArray weights() {
        return Nd4j.create(W, new long[] {5, 2}, DataType.FLOAT);
    }
}

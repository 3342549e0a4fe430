package org.deepep4j.examples;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertNotEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

import org.junit.jupiter.api.Test;
import org.nd4j.linalg.api.ndarray.INDArray;
import org.nd4j.linalg.ops.transforms.Transforms;

class TaskMixtureTest {
    @Test
    void sameSeedRankAndStepGiveTheSameBatch() {
        TaskMixture.Batch a = new TaskMixture(4, 8, 11).batch(1, 5, 64);
        TaskMixture.Batch b = new TaskMixture(4, 8, 11).batch(1, 5, 64);
        assertArrayEquals(a.task(), b.task());
        assertEquals(a.x(), b.x());
        assertEquals(a.y(), b.y());
        assertNotEquals(a.x(), new TaskMixture(4, 8, 11).batch(0, 5, 64).x(), "ranks must see different tokens");
    }

    @Test
    void shapesTasksAndTargetRange() {
        TaskMixture.Batch b = new TaskMixture(5, 6, 3).batch(0, 0, 400);
        assertArrayEquals(new long[] {400, 6}, b.x().shape());
        assertArrayEquals(new long[] {400, 6}, b.y().shape());
        boolean[] seen = new boolean[5];
        for (int t : b.task()) seen[t] = true;
        for (int t = 0; t < 5; t++) assertTrue(seen[t], "task " + t + " never drawn in 400 tokens");
        // Targets are tanh of something: strictly inside (-1, 1) and not all zero.
        assertTrue(b.y().amaxNumber().doubleValue() < 1.0);
        assertTrue(b.y().amaxNumber().doubleValue() > 0.1);
    }

    @Test
    void eachTargetIsTanhOfItsOwnTasksMap() {
        TaskMixture data = new TaskMixture(4, 5, 21);
        TaskMixture.Batch b = data.batch(1, 3, 12);
        for (int n = 0; n < 12; n++) {
            INDArray expected = Transforms.tanh(b.x().getRow(n, true).mmul(data.mapTransposed(b.task()[n])));
            for (int h = 0; h < 5; h++) {
                assertEquals(expected.getDouble(0, h), b.y().getDouble(n, h), 1e-5, "token " + n + " column " + h);
            }
        }
    }

    @Test
    void tokensOfOneTaskClusterAroundItsSignature() {
        TaskMixture.Batch b = new TaskMixture(3, 16, 9).batch(0, 0, 300);
        // Tokens of the same task are closer to each other than to tokens of other tasks (the router can learn tasks).
        double same = 0, other = 0;
        int ns = 0, no = 0;
        for (int i = 0; i < 60; i++) {
            for (int j = i + 1; j < 60; j++) {
                double d = b.x().getRow(i).distance2(b.x().getRow(j));
                if (b.task()[i] == b.task()[j]) { same += d; ns++; } else { other += d; no++; }
            }
        }
        assertTrue(same / ns < 0.7 * (other / no), "same-task distance " + same / ns + " vs other " + other / no);
    }
}

package org.deepep4j.examples;

import java.util.SplittableRandom;
import org.nd4j.linalg.api.buffer.DataType;
import org.nd4j.linalg.api.ndarray.INDArray;
import org.nd4j.linalg.factory.Nd4j;
import org.nd4j.linalg.indexing.NDArrayIndex;
import org.nd4j.linalg.ops.transforms.Transforms;

/**
 * A synthetic multi-task regression set, generated deterministically from a seed. Each token belongs to one of T tasks:
 * its input is the task's signature vector plus noise, its target is tanh(A_t x) with a task-specific matrix A_t. One
 * small expert cannot fit all tasks at once, so a router that sends each task to its own experts wins; the expert-load
 * heatmap shows that specialisation.
 */
public final class TaskMixture {
    /** One batch: inputs {@code x[N,H]}, targets {@code y[N,H]}, and each token's task id. */
    public record Batch(INDArray x, INDArray y, int[] task) {}

    private final int tasks;
    private final int hidden;
    private final long seed;
    private final float[][] signatures;
    /** [H, T*H]: columns t*H .. t*H+H-1 hold A_t transposed. */
    private final INDArray allMaps;

    public TaskMixture(int tasks, int hidden, long seed) {
        if (tasks < 1) throw new IllegalArgumentException("tasks " + tasks + " must be >= 1");
        if (hidden < 2) throw new IllegalArgumentException("hidden " + hidden + " must be >= 2");
        this.tasks = tasks;
        this.hidden = hidden;
        this.seed = seed;
        SplittableRandom rnd = new SplittableRandom(seed);
        signatures = new float[tasks][hidden];
        allMaps = Nd4j.create(DataType.FLOAT, hidden, (long) tasks * hidden);
        for (int t = 0; t < tasks; t++) {
            double norm = 0;
            for (int h = 0; h < hidden; h++) {
                signatures[t][h] = (float) gaussian(rnd);
                norm += signatures[t][h] * signatures[t][h];
            }
            // Signatures of length 2: well apart from each other relative to the noise, so the task is learnable.
            float scale = (float) (2.0 / Math.sqrt(norm));
            for (int h = 0; h < hidden; h++) signatures[t][h] *= scale;
            float[] a = new float[hidden * hidden];
            for (int i = 0; i < a.length; i++) a[i] = (float) (gaussian(rnd) * 1.5 / Math.sqrt(hidden));
            INDArray map = Nd4j.create(a, new long[] {hidden, hidden}, DataType.FLOAT);
            allMaps.get(NDArrayIndex.all(), NDArrayIndex.interval((long) t * hidden, (long) (t + 1) * hidden))
                    .assign(map.transpose());
        }
    }

    public int tasks() {
        return tasks;
    }

    public int hidden() {
        return hidden;
    }

    /** A_t transposed, [H, H]: the target of a task-t token x is tanh(x A_t^T). */
    INDArray mapTransposed(int t) {
        return allMaps.get(NDArrayIndex.all(), NDArrayIndex.interval((long) t * hidden, (long) (t + 1) * hidden));
    }

    /** The batch of {@code tokens} tokens that rank {@code rank} sees at global step {@code step}; same inputs, same batch. */
    public Batch batch(int rank, long step, int tokens) {
        if (tokens < 1) throw new IllegalArgumentException("tokens " + tokens + " must be >= 1");
        SplittableRandom rnd = new SplittableRandom(seed ^ (0x9E3779B97F4A7C15L * (step * 1024 + rank + 1)));
        int[] task = new int[tokens];
        float[] x = new float[tokens * hidden];
        for (int n = 0; n < tokens; n++) {
            task[n] = rnd.nextInt(tasks);
            for (int h = 0; h < hidden; h++) {
                x[n * hidden + h] = signatures[task[n]][h] + (float) (0.3 * gaussian(rnd));
            }
        }
        INDArray xs = Nd4j.create(x, new long[] {tokens, hidden}, DataType.FLOAT);
        // Every task's map on the whole batch in one matmul ([N, T*H]); each row then keeps its own task's H columns.
        float[] all = xs.mmul(allMaps).data().asFloat();
        float[] y = new float[tokens * hidden];
        for (int n = 0; n < tokens; n++) {
            System.arraycopy(all, (n * tasks + task[n]) * hidden, y, n * hidden, hidden);
        }
        INDArray ys = Transforms.tanh(Nd4j.create(y, new long[] {tokens, hidden}, DataType.FLOAT), false);
        return new Batch(xs, ys, task);
    }

    private static double gaussian(SplittableRandom rnd) {
        // Box-Muller: SplittableRandom has no nextGaussian on Java 17.
        double u = 1.0 - rnd.nextDouble();
        double v = rnd.nextDouble();
        return Math.sqrt(-2 * Math.log(u)) * Math.cos(2 * Math.PI * v);
    }
}

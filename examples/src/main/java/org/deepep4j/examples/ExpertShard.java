package org.deepep4j.examples;

import java.util.ArrayList;
import java.util.List;
import java.util.SplittableRandom;
import org.nd4j.linalg.api.buffer.DataType;
import org.nd4j.linalg.api.ndarray.INDArray;
import org.nd4j.linalg.factory.Nd4j;
import org.nd4j.linalg.ops.transforms.Transforms;

/**
 * The experts one rank owns: each is a two-layer MLP, o = relu(x W1 + b1) W2 + b2. Forward takes what dispatch delivered
 * (rows, local expert ids per top-k slot, weights) and returns one row per received token: the weighted sum of its local
 * experts' outputs, ready for combine. Backward returns the parameter gradients and the gradient of each slot's weight.
 */
public final class ExpertShard {
    private final int localExperts;
    private final int hidden;
    private final int inner;
    /** Parameters per local expert, in the order W1, b1, W2, b2. */
    private final List<INDArray[]> params = new ArrayList<>();
    private final List<INDArray[]> grads = new ArrayList<>();
    private final INDArray flatParams;
    private final INDArray flatGrads;
    private Forward last;

    /** What the backward pass needs of one forward call. */
    private record Forward(int rows, int topK, long[] ids, float[] weights, int[][] expertRows, INDArray[] inputs,
                           INDArray[] activations, INDArray[] outputs, int[][] slots) {}

    public ExpertShard(int firstGlobalExpert, int localExperts, int hidden, int inner, long seed) {
        this.localExperts = localExperts;
        this.hidden = hidden;
        this.inner = inner;
        long[][] shapes = {{hidden, inner}, {1, inner}, {inner, hidden}, {1, hidden}};
        long perExpert = 0;
        for (long[] sh : shapes) perExpert += sh[0] * sh[1];
        // All parameters (and gradients) live in one flat vector each, the arrays per expert are views into it: the
        // optimizer then updates everything with a handful of ND4J ops instead of a handful per array.
        flatParams = Nd4j.zeros(DataType.FLOAT, 1, perExpert * localExperts);
        flatGrads = Nd4j.zeros(DataType.FLOAT, 1, perExpert * localExperts);
        long offset = 0;
        for (int e = 0; e < localExperts; e++) {
            INDArray[] p = new INDArray[shapes.length];
            INDArray[] g = new INDArray[shapes.length];
            for (int i = 0; i < shapes.length; i++) {
                long[] stride = {shapes[i][1], 1};
                p[i] = Nd4j.create(flatParams.data(), shapes[i], stride, offset, 'c');
                g[i] = Nd4j.create(flatGrads.data(), shapes[i], stride, offset, 'c');
                offset += shapes[i][0] * shapes[i][1];
            }
            // Seeded by global expert id: the same model whatever the number of ranks. Biases start at zero.
            SplittableRandom rnd = new SplittableRandom(seed * 1_000_003L + firstGlobalExpert + e);
            p[0].assign(uniform(rnd, hidden, inner, Math.sqrt(6.0 / hidden)));
            p[2].assign(uniform(rnd, inner, hidden, Math.sqrt(6.0 / (inner + hidden))));
            params.add(p);
            grads.add(g);
        }
    }

    /** Every parameter of this shard as one vector; {@link #params()} are views into it. */
    public INDArray flatParams() {
        return flatParams;
    }

    /** Gradients in the layout of {@link #flatParams()}, filled by {@link #backward}. */
    public INDArray flatGrads() {
        return flatGrads;
    }

    public List<INDArray[]> params() {
        return params;
    }

    public List<INDArray[]> grads() {
        return grads;
    }

    /**
     * @param recvX    [M,H] received rows
     * @param recvIdx  [M,K] local expert id per slot, -1 where the slot's expert lives on another rank
     * @param recvW    [M,K] the slot's routing weight
     * @return [M,H] per received token, sum over its local slots of weight * expert output
     */
    public INDArray forward(INDArray recvX, INDArray recvIdx, INDArray recvW) {
        int m = (int) recvX.size(0);
        int k = (int) recvIdx.size(1);
        long[] ids = m == 0 ? new long[0] : recvIdx.data().asLong();
        float[] w = m == 0 ? new float[0] : recvW.castTo(DataType.FLOAT).data().asFloat();
        INDArray[] inputs = new INDArray[localExperts];
        INDArray[] acts = new INDArray[localExperts];
        INDArray[] outs = new INDArray[localExperts];
        int[][] slots = new int[localExperts][];
        int[][] rows = new int[localExperts][];
        float[] y = new float[m * hidden];
        for (int e = 0; e < localExperts; e++) {
            slots[e] = slotsOf(ids, e);
            int me = slots[e].length;
            if (me == 0) continue;
            rows[e] = new int[me];
            for (int j = 0; j < me; j++) rows[e][j] = slots[e][j] / k;
            INDArray[] p = params.get(e);
            inputs[e] = Nd4j.pullRows(recvX, 1, rows[e]);
            acts[e] = Transforms.relu(inputs[e].mmul(p[0]).addiRowVector(p[1]), false);
            outs[e] = acts[e].mmul(p[2]).addiRowVector(p[3]);
            // Scatter-add of weight * output into the expert's rows: plain Java over a few thousand floats.
            float[] o = outs[e].data().asFloat();
            for (int j = 0; j < me; j++) {
                float wj = w[slots[e][j]];
                int dst = rows[e][j] * hidden;
                for (int h = 0; h < hidden; h++) y[dst + h] += wj * o[j * hidden + h];
            }
        }
        last = new Forward(m, k, ids, w, rows, inputs, acts, outs, slots);
        return Nd4j.create(y, new long[] {m, hidden}, DataType.FLOAT);
    }

    /**
     * Backward of the last {@link #forward}: fills {@link #grads()} and returns the gradient of each slot's weight as
     * [M,K] (zero where the slot's expert is elsewhere).
     */
    public float[] backward(INDArray gradY) {
        Forward f = last;
        if (f == null) throw new IllegalStateException("backward called before forward");
        float[] gradW = new float[f.rows() * f.topK()];
        for (int e = 0; e < localExperts; e++) {
            INDArray[] g = grads.get(e);
            if (f.slots()[e].length == 0) {
                for (INDArray a : g) a.assign(0);
                continue;
            }
            INDArray[] p = params.get(e);
            INDArray gradOut = Nd4j.pullRows(gradY, 1, f.expertRows()[e]);
            float[] dw = gradOut.mul(f.outputs()[e]).sum(1).data().asFloat();
            int[] slots = f.slots()[e];
            float[] slotW = new float[slots.length];
            for (int j = 0; j < slots.length; j++) {
                gradW[slots[j]] = dw[j];
                slotW[j] = f.weights()[slots[j]];
            }
            gradOut.muliColumnVector(Nd4j.create(slotW, new long[] {slots.length, 1}, DataType.FLOAT));
            g[2].assign(f.activations()[e].transpose().mmul(gradOut));
            g[3].assign(gradOut.sum(true, 0));
            INDArray gradAct = gradOut.mmul(p[2].transpose()).muli(f.activations()[e].gt(0).castTo(DataType.FLOAT));
            g[0].assign(f.inputs()[e].transpose().mmul(gradAct));
            g[1].assign(gradAct.sum(true, 0));
        }
        return gradW;
    }

    /** Flat positions row*K+slot whose local expert is {@code e}. */
    private static int[] slotsOf(long[] ids, int e) {
        int count = 0;
        for (long id : ids) if (id == e) count++;
        int[] out = new int[count];
        int j = 0;
        for (int i = 0; i < ids.length; i++) if (ids[i] == e) out[j++] = i;
        return out;
    }

    static INDArray uniform(SplittableRandom rnd, int rows, int cols, double limit) {
        float[] a = new float[rows * cols];
        for (int i = 0; i < a.length; i++) a[i] = (float) ((rnd.nextDouble() * 2 - 1) * limit);
        return Nd4j.create(a, new long[] {rows, cols}, DataType.FLOAT);
    }
}

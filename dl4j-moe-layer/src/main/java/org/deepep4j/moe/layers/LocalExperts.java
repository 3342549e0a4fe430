package org.deepep4j.moe.layers;

import org.nd4j.linalg.api.buffer.DataType;
import org.nd4j.linalg.api.ndarray.INDArray;
import org.nd4j.linalg.factory.Nd4j;

import java.util.List;

/**
 * The rank's routed experts over the received rows, grouped by expert: each expert gathers its rows and runs one
 * SwiGLU (one GEMM per weight) over them. A received row m sends its slot k to local expert recvTopkIdx[m,k] (or
 * nowhere when -1); its output row is the weighted sum over its slots. Results go back to row order with gathers
 * (one per slot) from the expert-ordered results plus a zero row, which avoids scatter-adds.
 */
final class LocalExperts {

    private final int m;
    private final int k;
    private final int numLocal;
    /** Per expert: received rows and the slot each row used. */
    private final int[][] rows;
    private final int[][] slots;
    /** Per slot: for each row, the position of its assignment in expert order, or {@code assignments} (zero row). */
    private final int[][] where;
    private final int assignments;
    private final double[] recvWeights;
    private final DataType weightType;
    private final SwiGlu[] blocks;
    private final INDArray[] weightCols;
    final INDArray y;

    /** @param weights per local expert {w1, w3, w2} */
    LocalExperts(INDArray recvX, INDArray recvTopkIdx, INDArray recvTopkWeights, List<INDArray[]> weights) {
        m = (int) recvX.size(0);
        k = (int) recvTopkIdx.size(1);
        numLocal = weights.size();
        long[] idx = m == 0 ? new long[0] : recvTopkIdx.dup('c').data().asLong();
        // read once on the host; the weights keep their type (FLOAT, or DOUBLE in a double network) for the gradient
        weightType = recvTopkWeights == null ? DataType.FLOAT : recvTopkWeights.dataType();
        recvWeights = m == 0 ? new double[0] : recvTopkWeights.dup('c').data().asDouble();
        int[] count = new int[numLocal];
        for (long e : idx) {
            if (e >= numLocal) {
                throw new IllegalStateException("recvTopkIdx value " + e + ": must be -1 or a local expert id in [0, "
                        + numLocal + ")");
            }
            if (e >= 0) {
                count[(int) e]++;
            }
        }
        rows = new int[numLocal][];
        slots = new int[numLocal][];
        int[] start = new int[numLocal + 1];
        for (int j = 0; j < numLocal; j++) {
            rows[j] = new int[count[j]];
            slots[j] = new int[count[j]];
            start[j + 1] = start[j] + count[j];
        }
        assignments = start[numLocal];
        where = new int[k][m];
        int[] fill = new int[numLocal];
        for (int s = 0; s < k; s++) {
            java.util.Arrays.fill(where[s], assignments);
        }
        for (int r = 0; r < m; r++) {
            for (int s = 0; s < k; s++) {
                long e = idx[r * k + s];
                if (e >= 0) {
                    int j = (int) e;
                    rows[j][fill[j]] = r;
                    slots[j][fill[j]] = s;
                    where[s][r] = start[j] + fill[j];
                    fill[j]++;
                }
            }
        }
        blocks = new SwiGlu[numLocal];
        weightCols = new INDArray[numLocal];
        INDArray[] weighted = new INDArray[numLocal];
        for (int j = 0; j < numLocal; j++) {
            if (rows[j].length == 0) {
                continue;
            }
            INDArray[] w = weights.get(j);
            blocks[j] = new SwiGlu(Nd4j.pullRows(recvX, 1, rows[j]), w[0], w[1], w[2]);
            double[] col = new double[rows[j].length];
            for (int i = 0; i < col.length; i++) {
                col[i] = recvWeights[rows[j][i] * k + slots[j][i]];
            }
            weightCols[j] = Nd4j.createFromArray(col).reshape(col.length, 1).castTo(recvX.dataType());
            weighted[j] = blocks[j].y.mulColumnVector(weightCols[j]);
        }
        y = toRowOrder(weighted, recvX.dataType(), recvX.size(1));
    }

    private INDArray toRowOrder(INDArray[] perExpert, DataType type, long h) {
        if (m == 0) {
            return Nd4j.create(type, 0, h);
        }
        INDArray[] parts = new INDArray[numLocal + 1];
        int p = 0;
        for (INDArray a : perExpert) {
            if (a != null) {
                parts[p++] = a;
            }
        }
        parts[p++] = Nd4j.zeros(type, 1, h);
        INDArray all = Nd4j.vstack(java.util.Arrays.copyOf(parts, p));
        INDArray out = Nd4j.pullRows(all, 1, where[0]);
        for (int s = 1; s < k; s++) {
            out.addi(Nd4j.pullRows(all, 1, where[s]));
        }
        return out;
    }

    /**
     * @param gy gradient of {@link #y}, [M, H]
     * @param gWeights per local expert, receives {gW1, gW3, gW2} (zero for experts without rows)
     * @return {gRecvX [M, H], gRecvTopkWeights [M, K]}
     */
    INDArray[] backward(INDArray gy, List<INDArray[]> gWeights) {
        DataType type = gy.dataType();
        double[] gRecvW = new double[m * k];
        INDArray[] gx = new INDArray[numLocal];
        for (int j = 0; j < numLocal; j++) {
            INDArray[] g = gWeights.get(j);
            if (blocks[j] == null) {
                for (INDArray a : g) {
                    a.assign(0.0);
                }
                continue;
            }
            INDArray gyE = Nd4j.pullRows(gy, 1, rows[j]);
            double[] gw = gyE.mul(blocks[j].y).sum(1).castTo(DataType.DOUBLE).dup('c').data().asDouble();
            for (int i = 0; i < gw.length; i++) {
                gRecvW[rows[j][i] * k + slots[j][i]] = gw[i];
            }
            INDArray[] b = blocks[j].backward(gyE.mulColumnVector(weightCols[j]));
            gx[j] = b[0];
            g[0].assign(b[1]);
            g[1].assign(b[2]);
            g[2].assign(b[3]);
        }
        INDArray gRecvX = toRowOrder(gx, type, gy.size(1));
        INDArray gw = Nd4j.createFromArray(gRecvW).reshape(m, k).castTo(weightType);
        return new INDArray[]{gRecvX, gw};
    }
}

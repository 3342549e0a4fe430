package org.deepep4j.moe.exchange;

import org.nd4j.linalg.api.ndarray.INDArray;

/**
 * Moves token rows between the ranks of an expert-parallel group (dispatch) and brings expert results back (combine).
 * One instance per rank; every method is collective (all ranks call it, in the same order). Semantics are those of
 * deepep4j's C API: a token is received once by each rank owning one of its experts, rows grouped by source rank in
 * source-token order; combine sums, per original token, the rows returned by the ranks it visited.
 */
public interface ExpertExchange extends AutoCloseable {

    int rank();

    int numRanks();

    /**
     * @param x           [N, H] token rows
     * @param topkIdx     [N, K] global expert ids (int64), -1 = none
     * @param topkWeights [N, K] routing weights
     */
    Dispatched dispatch(INDArray x, INDArray topkIdx, INDArray topkWeights, int numExperts);

    /**
     * Backward of dispatch, forward of the MoE output: {@code out[n] = sum over visited ranks of y[m]}; when
     * {@code yTopkWeights} is given, {@code outTopkWeights[n,k]} = sum over ranks of {@code yTopkWeights[m,k]}.
     */
    Combined combine(Dispatched d, INDArray y, INDArray yTopkWeights);

    /** Backward of combine: sends {@code g [N, H]} along the cached layout of {@code d}; returns [M, H]. */
    INDArray dispatchCached(Dispatched d, INDArray g);

    @Override
    default void close() {
    }

    /** Rows a rank received. */
    final class Dispatched implements AutoCloseable {
        public final INDArray recvX;
        /** [M, K] local expert ids, -1 where the expert lives on another rank. */
        public final INDArray recvTopkIdx;
        public final INDArray recvTopkWeights;
        /** Backend state for combine and cached dispatch. */
        public final Object handle;
        /** Rows received per local expert. */
        public final int[] recvTokensPerExpert;

        public Dispatched(INDArray recvX, INDArray recvTopkIdx, INDArray recvTopkWeights, int[] recvTokensPerExpert,
                          Object handle) {
            this.recvX = recvX;
            this.recvTopkIdx = recvTopkIdx;
            this.recvTopkWeights = recvTopkWeights;
            this.recvTokensPerExpert = recvTokensPerExpert;
            this.handle = handle;
        }

        @Override
        public void close() throws Exception {
            if (handle instanceof AutoCloseable) {
                ((AutoCloseable) handle).close();
            }
        }
    }

    /** Result of a combine. */
    final class Combined {
        public final INDArray out;
        public final INDArray outTopkWeights;

        public Combined(INDArray out, INDArray outTopkWeights) {
            this.out = out;
            this.outTopkWeights = outTopkWeights;
        }
    }
}

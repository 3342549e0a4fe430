package org.deepep4j.moe.exchange;

import org.nd4j.linalg.api.ndarray.INDArray;

/**
 * Moves token rows between the ranks of an expert-parallel group (dispatch) and brings expert results back (combine).
 * One instance per rank; every collective call is made by all ranks in the same order. Semantics are those of
 * deepep4j's C API: a token is received once by each rank owning one of its experts, rows grouped by source rank in
 * source-token order; combine sums, per original token, the rows returned by the ranks it visited.
 * <p>
 * Routing weights are FLOAT, the engine's type, from the router to the experts and back (a double-precision network,
 * which only runs without the engine, keeps them DOUBLE so gradient checks stay exact); no implementation converts them.
 */
public interface ExpertExchange extends AutoCloseable {

    int rank();

    int numRanks();

    /**
     * Collective.
     * @param x           [N, H] token rows
     * @param topkIdx     [N, K] global expert ids (LONG), -1 = none
     * @param topkWeights [N, K] routing weights (FLOAT)
     */
    Dispatched dispatch(INDArray x, INDArray topkIdx, INDArray topkWeights, int numExperts);

    /**
     * Collective: a rank that failed outside a collective call joins its peers' current (or next) call with
     * {@code message}, so they stop with an error naming this rank instead of waiting for it. Nothing to do where the
     * last collective call already failed on every rank, or where the transport has no such step (the default).
     */
    default void fail(String message) {
    }

    /**
     * Collective: the closing step of a run; returns when every rank made it and throws when a rank joined it with its
     * failure ({@link #fail}), so no rank reports success while another failed. Nothing by default.
     */
    default void finish() {
    }

    @Override
    default void close() {
    }

    /** What a rank received from one dispatch, and the collective calls that reuse its routing. */
    interface Dispatched extends AutoCloseable {
        /** [M, H] received rows, in x's dtype. */
        INDArray recvX();

        /** [M, K] LONG local expert ids, -1 where the expert lives on another rank. */
        INDArray recvTopkIdx();

        /** [M, K] routing weights, in topkWeights' dtype; 0 where the expert is not local. */
        INDArray recvTopkWeights();

        /** Rows received per local expert. */
        int[] recvTokensPerExpert();

        /**
         * Collective. Backward of dispatch, forward of the MoE output: {@code out[n]} = sum over the ranks token n
         * visited of {@code y[m]}; when {@code yTopkWeights} [M, K] is given, {@code outTopkWeights[n, k]} = sum over
         * ranks of {@code yTopkWeights[m, k]} (the gradient path of the routing weights).
         */
        Combined combine(INDArray y, INDArray yTopkWeights);

        /** Collective. Backward of combine: sends {@code g} [N, H] along this dispatch's routing; returns [M, H]. */
        INDArray dispatchCached(INDArray g);

        /** Frees the routing state (native memory on the engine). */
        @Override
        void close();
    }

    /** Result of a combine: [N, H] rows and, when asked for, [N, K] per-(token, k) values. */
    record Combined(INDArray out, INDArray outTopkWeights) {
    }
}

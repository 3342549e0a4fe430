package org.deepep4j.moe.exchange;

import org.deepep4j.EpBuffer;
import org.deepep4j.EpCombineResult;
import org.deepep4j.EpDispatchResult;
import org.nd4j.linalg.api.ndarray.INDArray;

/**
 * Expert exchange through deepep4j's native engine: one {@link EpBuffer} per rank (CPU shared-memory ranks, or GPUs).
 * Token rows must be fp32, bf16 or fp16 (the engine's types); a double-precision network is rejected by the engine
 * with an error naming x. Routing weights travel as fp32.
 */
public final class EpBufferExchange implements ExpertExchange {

    private final EpBuffer buffer;
    private final boolean closeBuffer;

    /** @param closeBuffer whether {@link #close()} also closes the buffer */
    public EpBufferExchange(EpBuffer buffer, boolean closeBuffer) {
        if (buffer == null) {
            throw new IllegalArgumentException("buffer=null: an EpBuffer is required");
        }
        this.buffer = buffer;
        this.closeBuffer = closeBuffer;
    }

    public EpBuffer buffer() {
        return buffer;
    }

    @Override
    public int rank() {
        return buffer.rank();
    }

    @Override
    public int numRanks() {
        return buffer.numRanks();
    }

    @Override
    public Dispatched dispatch(INDArray x, INDArray topkIdx, INDArray topkWeights, int numExperts) {
        return new Routed(buffer.dispatch(x, topkIdx, topkWeights, numExperts));
    }

    @Override
    public void fail(String message) {
        buffer.joinStepWithFailure(message);
    }

    @Override
    public void finish() {
        buffer.barrier();
    }

    @Override
    public void close() {
        if (closeBuffer) {
            buffer.close();
        }
    }

    /** One dispatch on the engine: its result and handle. */
    private final class Routed implements Dispatched {
        private final EpDispatchResult d;

        Routed(EpDispatchResult d) {
            this.d = d;
        }

        @Override
        public INDArray recvX() {
            return d.recvX();
        }

        @Override
        public INDArray recvTopkIdx() {
            return d.recvTopkIdx();
        }

        @Override
        public INDArray recvTopkWeights() {
            return d.recvTopkWeights();
        }

        @Override
        public int[] recvTokensPerExpert() {
            return d.recvTokensPerExpert();
        }

        @Override
        public Combined combine(INDArray y, INDArray yTopkWeights) {
            EpCombineResult r = buffer.combine(y, d.handle(), null, yTopkWeights);
            return new Combined(r.out(), r.outTopkWeights());
        }

        @Override
        public INDArray dispatchCached(INDArray g) {
            return buffer.dispatch(g, d.handle());
        }

        @Override
        public void close() {
            d.handle().close();
        }
    }
}

package org.deepep4j.moe.exchange;

import org.deepep4j.EpBuffer;
import org.deepep4j.EpCombineResult;
import org.deepep4j.EpDispatchResult;
import org.deepep4j.EpHandle;
import org.nd4j.linalg.api.buffer.DataType;
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
        EpDispatchResult d = buffer.dispatch(x, topkIdx.castTo(DataType.LONG),
                topkWeights == null ? null : topkWeights.castTo(DataType.FLOAT), numExperts);
        INDArray w = d.recvTopkWeights() == null ? null : d.recvTopkWeights().castTo(x.dataType());
        return new Dispatched(d.recvX(), d.recvTopkIdx(), w, d.recvTokensPerExpert(), d.handle());
    }

    @Override
    public Combined combine(Dispatched d, INDArray y, INDArray yTopkWeights) {
        EpCombineResult r = buffer.combine(y, (EpHandle) d.handle, null,
                yTopkWeights == null ? null : yTopkWeights.castTo(DataType.FLOAT));
        INDArray w = r.outTopkWeights() == null ? null : r.outTopkWeights().castTo(y.dataType());
        return new Combined(r.out(), w);
    }

    @Override
    public INDArray dispatchCached(Dispatched d, INDArray g) {
        return buffer.dispatch(g, (EpHandle) d.handle);
    }

    @Override
    public void close() {
        if (closeBuffer) {
            buffer.close();
        }
    }
}

package org.deepep4j.moe.exchange;

import org.nd4j.linalg.api.ndarray.INDArray;

/** A group of one rank: every expert is local, so dispatch and combine are identities. */
public final class LocalExchange implements ExpertExchange {

    public static final LocalExchange INSTANCE = new LocalExchange();

    private LocalExchange() {
    }

    @Override
    public int rank() {
        return 0;
    }

    @Override
    public int numRanks() {
        return 1;
    }

    @Override
    public Dispatched dispatch(INDArray x, INDArray topkIdx, INDArray topkWeights, int numExperts) {
        int[] perExpert = new int[numExperts];
        for (long e : topkIdx.dup().data().asLong()) {
            if (e >= 0) {
                perExpert[(int) e]++;
            }
        }
        return new Dispatched() {
            @Override
            public INDArray recvX() {
                return x;
            }

            @Override
            public INDArray recvTopkIdx() {
                return topkIdx;
            }

            @Override
            public INDArray recvTopkWeights() {
                return topkWeights;
            }

            @Override
            public int[] recvTokensPerExpert() {
                return perExpert.clone();
            }

            @Override
            public Combined combine(INDArray y, INDArray yTopkWeights) {
                return new Combined(y, yTopkWeights);
            }

            @Override
            public INDArray dispatchCached(INDArray g) {
                return g;
            }

            @Override
            public void close() {
            }
        };
    }
}

package org.deepep4j.moe;

import org.deepep4j.moe.exchange.ExpertExchange;
import org.deepep4j.moe.exchange.LocalExchange;
import org.deepep4j.moe.layers.MoELayerImpl;
import org.deeplearning4j.nn.multilayer.MultiLayerNetwork;
import org.junit.jupiter.api.Test;
import org.nd4j.linalg.api.buffer.DataType;
import org.nd4j.linalg.api.ndarray.INDArray;
import org.nd4j.linalg.learning.config.Sgd;

import java.util.ArrayList;
import java.util.List;

import static org.junit.jupiter.api.Assertions.assertEquals;

/** The exchange seam: routing weights cross it as FLOAT in every direction, whatever the network's dtype. */
class ExchangeSeamTest {

    /** Records the dtypes of the routing weights that cross the seam, around the one-rank exchange. */
    private static final class Recording implements ExpertExchange {
        final List<String> seen = new ArrayList<>();

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
            seen.add("dispatch x " + x.dataType() + " weights " + topkWeights.dataType());
            Dispatched d = LocalExchange.INSTANCE.dispatch(x, topkIdx, topkWeights, numExperts);
            return new Dispatched() {
                public INDArray recvX() { return d.recvX(); }
                public INDArray recvTopkIdx() { return d.recvTopkIdx(); }
                public INDArray recvTopkWeights() { return d.recvTopkWeights(); }
                public int[] recvTokensPerExpert() { return d.recvTokensPerExpert(); }
                public Combined combine(INDArray y, INDArray yTopkWeights) {
                    seen.add("combine y " + y.dataType() + " weights "
                            + (yTopkWeights == null ? "none" : yTopkWeights.dataType()));
                    return d.combine(y, yTopkWeights);
                }
                public INDArray dispatchCached(INDArray g) { return d.dispatchCached(g); }
                public void close() { d.close(); }
            };
        }
    }

    @Test
    void routingWeightsCrossTheSeamAsFloat() {
        for (DataType type : new DataType[]{DataType.FLOAT, DataType.HALF}) {
            MultiLayerNetwork net = new MultiLayerNetwork(Nets.ff(type, new Sgd(1e-2), Nets.moe(), 8));
            net.init();
            Recording rec = new Recording();
            ((MoELayerImpl) net.getLayer(1)).setExchange(rec);
            net.fit(new org.nd4j.linalg.dataset.DataSet(Nets.input(type, 1, 6, 8), Nets.labels(type, 2, 6)));
            assertEquals(List.of("dispatch x " + type + " weights FLOAT", "combine y " + type + " weights none",
                    "combine y " + type + " weights FLOAT"), rec.seen, "network dtype " + type);
        }
    }
}

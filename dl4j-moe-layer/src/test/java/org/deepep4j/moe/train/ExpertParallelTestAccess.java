package org.deepep4j.moe.train;

import org.deeplearning4j.nn.api.Model;
import org.nd4j.linalg.api.ndarray.INDArray;

/** Test access to package-private trainer parts. */
public final class ExpertParallelTestAccess {
    private ExpertParallelTestAccess() {
    }

    public static INDArray replicatedMask(Model net) {
        return GradientAverager.replicatedMask(NetworkAdapter.of(net));
    }
}

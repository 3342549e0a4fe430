package org.deepep4j.examples;

import org.nd4j.linalg.api.ndarray.INDArray;
import org.nd4j.linalg.ops.transforms.Transforms;

/** Adam for one parameter array, updated in place. */
public final class Adam {
    private static final double BETA1 = 0.9;
    private static final double BETA2 = 0.999;
    private static final double EPS = 1e-8;
    private final INDArray m;
    private final INDArray v;
    private final double lr;
    private int t;

    public Adam(INDArray param, double lr) {
        this.m = param.ulike().assign(0);
        this.v = param.ulike().assign(0);
        this.lr = lr;
    }

    public void step(INDArray param, INDArray grad) {
        t++;
        m.muli(BETA1).addi(grad.mul(1 - BETA1));
        v.muli(BETA2).addi(grad.mul(grad).muli(1 - BETA2));
        double stepSize = lr * Math.sqrt(1 - Math.pow(BETA2, t)) / (1 - Math.pow(BETA1, t));
        param.subi(m.div(Transforms.sqrt(v, true).addi(EPS)).muli(stepSize));
    }
}

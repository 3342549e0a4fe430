package org.deepep4j.moe.layers;

import org.nd4j.linalg.api.ndarray.INDArray;
import org.nd4j.linalg.ops.transforms.Transforms;

/**
 * One SwiGLU feed-forward block {@code y = (silu(x W1) * (x W3)) W2} over a group of token rows, keeping what its
 * backward needs.
 */
final class SwiGlu {

    final INDArray x;
    private final INDArray w1;
    private final INDArray w3;
    private final INDArray w2;
    private final INDArray a;
    private final INDArray b;
    private final INDArray sig;
    private final INDArray act;
    private final INDArray h;
    final INDArray y;

    SwiGlu(INDArray x, INDArray w1, INDArray w3, INDArray w2) {
        this.x = x;
        this.w1 = w1;
        this.w3 = w3;
        this.w2 = w2;
        a = x.mmul(w1);
        b = x.mmul(w3);
        sig = Transforms.sigmoid(a, true);
        act = a.mul(sig);
        h = act.mul(b);
        y = h.mmul(w2);
    }

    /** Gradients of the block for output gradient {@code gy}: returns {gx, gW1, gW3, gW2}. */
    INDArray[] backward(INDArray gy) {
        INDArray gW2 = h.transpose().mmul(gy);
        INDArray gh = gy.mmul(w2.transpose());
        INDArray gb = gh.mul(act);
        // d silu(a)/da = sig * (1 + a * (1 - sig))
        INDArray dsilu = sig.rsub(1.0).muli(a).addi(1.0).muli(sig);
        INDArray ga = gh.mul(b).muli(dsilu);
        INDArray gW1 = x.transpose().mmul(ga);
        INDArray gW3 = x.transpose().mmul(gb);
        INDArray gx = ga.mmul(w1.transpose()).addi(gb.mmul(w3.transpose()));
        return new INDArray[]{gx, gW1, gW3, gW2};
    }
}

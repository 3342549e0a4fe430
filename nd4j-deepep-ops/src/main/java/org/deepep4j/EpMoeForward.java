package org.deepep4j;

import org.nd4j.linalg.api.ndarray.INDArray;

/** Outputs of one {@link EpMoeBlock} forward (host arrays). */
public final class EpMoeForward {
  private final INDArray y;
  private final INDArray topkIdx;
  private final INDArray topkWeights;
  private final int[] expertLoad;
  private final int[] recvPerLocalExpert;
  private final double auxLoss;

  EpMoeForward(INDArray y, INDArray topkIdx, INDArray topkWeights, int[] expertLoad, int[] recvPerLocalExpert, double auxLoss) {
    this.y = y;
    this.topkIdx = topkIdx;
    this.topkWeights = topkWeights;
    this.expertLoad = expertLoad;
    this.recvPerLocalExpert = recvPerLocalExpert;
    this.auxLoss = auxLoss;
  }

  /** [N, H] in the block's dtype. */
  public INDArray y() { return y; }
  /** [N, K] chosen global experts (long). */
  public INDArray topkIdx() { return topkIdx; }
  /** [N, K] routing weights (float). */
  public INDArray topkWeights() { return topkWeights; }
  /** This rank's assignments per global expert. */
  public int[] expertLoad() { return expertLoad.clone(); }
  /** Rows received per local expert. */
  public int[] recvPerLocalExpert() { return recvPerLocalExpert.clone(); }
  /** This rank's load-balancing loss (0 when the coefficient is 0). */
  public double auxLoss() { return auxLoss; }
}

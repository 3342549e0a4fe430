package org.deepep4j;

import org.nd4j.linalg.api.ndarray.INDArray;

/** Outputs of one {@link EpMoeBlock} backward (host arrays in the block's dtype). */
public final class EpMoeBackward {
  private final INDArray gradX;
  private final INDArray gradRouterWeight;

  EpMoeBackward(INDArray gradX, INDArray gradRouterWeight) {
    this.gradX = gradX;
    this.gradRouterWeight = gradRouterWeight;
  }

  /** [N, H]: through the experts, the combine weights and the router. */
  public INDArray gradX() { return gradX; }
  /** [H, E]. */
  public INDArray gradRouterWeight() { return gradRouterWeight; }
}

package org.deepep4j;

import org.nd4j.linalg.api.ndarray.INDArray;

/** Combine's outputs: the reduced rows [N, H] and, when asked for, the returned per-(token, k) values [N, K]. */
public final class EpCombineResult {
  private final INDArray out;
  private final INDArray outTopkWeights;

  EpCombineResult(INDArray out, INDArray outTopkWeights) {
    this.out = out;
    this.outTopkWeights = outTopkWeights;
  }

  public INDArray out() { return out; }
  public INDArray outTopkWeights() { return outTopkWeights; }
}

package org.deepep4j;

import org.nd4j.linalg.api.ndarray.INDArray;

/** What a rank received: rows grouped by source rank, then in source-token order. */
public final class EpDispatchResult {
  private final INDArray recvX;
  private final INDArray recvTopkIdx;
  private final INDArray recvTopkWeights;
  private final EpHandle handle;

  EpDispatchResult(INDArray recvX, INDArray recvTopkIdx, INDArray recvTopkWeights, EpHandle handle) {
    this.recvX = recvX;
    this.recvTopkIdx = recvTopkIdx;
    this.recvTopkWeights = recvTopkWeights;
    this.handle = handle;
  }

  /** [M, H], the dtype of x. */
  public INDArray recvX() { return recvX; }
  /** [M, K] long: local expert ids, -1 where the expert lives on another rank. */
  public INDArray recvTopkIdx() { return recvTopkIdx; }
  /** [M, K] float, 0 where the expert is not local; null when no weights were dispatched. */
  public INDArray recvTopkWeights() { return recvTopkWeights; }
  /** (token, k) entries received for each local expert. */
  public int[] recvTokensPerExpert() { return handle.recvTokensPerExpert(); }
  public EpHandle handle() { return handle; }
}

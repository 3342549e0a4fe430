package org.deepep4j.samediff;

import org.nd4j.autodiff.samediff.SDVariable;

/** The outputs of a graph dispatch, and the op whose handle its combine uses. */
public final class EpDispatchVars {
  private final EpDispatchOp op;
  private final SDVariable[] out;

  EpDispatchVars(EpDispatchOp op) {
    this.op = op;
    this.out = op.outputVariables();
  }

  /** [M, H], dtype of x. */
  public SDVariable recvX() { return out[0]; }
  /** [M, K] long: local expert ids, -1 where the expert lives elsewhere. */
  public SDVariable recvTopkIdx() { return out[1]; }
  /** [M, K] float, or null when no weights were dispatched. */
  public SDVariable recvTopkWeights() { return out.length > 2 ? out[2] : null; }
  public EpDispatchOp op() { return op; }
}

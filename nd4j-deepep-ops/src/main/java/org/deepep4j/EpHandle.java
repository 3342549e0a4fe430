package org.deepep4j;

import org.deepep4j.natives.DeepEp4jNative;
import org.nd4j.linalg.api.ndarray.INDArray;

/**
 * The routing of one dispatch: which rows went where. Combine uses it to send rows back; backward passes reuse it
 * ("cached mode"): grad of dispatch = combine, grad of combine = dispatch. Belongs to the buffer that made it.
 */
public final class EpHandle implements AutoCloseable {
  private final EpBuffer owner;
  private DeepEp4jNative.Handle handle;
  private final long numTokens;
  private final long numRecvTokens;
  private final int numTopk;
  private final int numExperts;
  private final long hidden;
  private final int[] recvTokensPerExpert;
  INDArray recvTopkIdx;  // local expert ids of the first dispatch, for weighted combines in backward

  EpHandle(EpBuffer owner, DeepEp4jNative.Handle handle, long numTokens, long numRecvTokens, int numTopk, int numExperts,
           long hidden, int[] recvTokensPerExpert) {
    this.owner = owner;
    this.handle = handle;
    this.numTokens = numTokens;
    this.numRecvTokens = numRecvTokens;
    this.numTopk = numTopk;
    this.numExperts = numExperts;
    this.hidden = hidden;
    this.recvTokensPerExpert = recvTokensPerExpert;
  }

  /** N: tokens this rank dispatched. */
  public long numTokens() { return numTokens; }
  /** M: rows this rank received. */
  public long numRecvTokens() { return numRecvTokens; }
  public int numTopk() { return numTopk; }
  public int numExperts() { return numExperts; }
  public long hidden() { return hidden; }
  /** (token, k) entries received for each local expert. */
  public int[] recvTokensPerExpert() { return recvTokensPerExpert.clone(); }
  /** Local expert ids [M, K] delivered by the dispatch that made this handle. */
  public INDArray recvTopkIdx() { return recvTopkIdx; }
  public EpBuffer buffer() { return owner; }

  DeepEp4jNative.Handle nativeHandle() {
    if (handle == null) throw new IllegalStateException("handle: already closed");
    return handle;
  }

  public boolean isClosed() { return handle == null; }

  @Override
  public synchronized void close() {
    if (handle != null) {
      DeepEp4jNative.deepep4j_handle_destroy(handle);
      handle = null;
      owner.forget(this);
    }
  }
}

package org.deepep4j.samediff;

import java.util.ArrayList;
import java.util.Arrays;
import java.util.List;
import org.deepep4j.EpDispatchResult;
import org.deepep4j.EpHandle;
import org.nd4j.autodiff.samediff.SDVariable;
import org.nd4j.autodiff.samediff.SameDiff;
import org.nd4j.linalg.api.buffer.DataType;
import org.nd4j.linalg.api.ndarray.INDArray;
import org.nd4j.linalg.api.shape.LongShapeDescriptor;

/**
 * Dispatch as a graph op. Inputs: x [N, H], topkIdx [N, K] long, optional topkWeights [N, K] float. Outputs: recvX
 * [M, H] (dtype of x), recvTopkIdx [M, K] long, and recvTopkWeights [M, K] float when weights are given. Attributes:
 * iArg 0 buffer id, iArg 1 process token, iArg 2 numExperts, iArg 3 weighted (0/1). Keeps the handle of its last run for combine and for the backward passes; the
 * previous handle is freed when a new run starts.
 */
public class EpDispatchOp extends EpCustomOp {
  private EpHandle pending;  // counts exchanged by shapes(), rows not yet moved
  private EpHandle handle;   // the last completed dispatch

  public EpDispatchOp() {}

  public EpDispatchOp(SameDiff sd, SDVariable x, SDVariable topkIdx, SDVariable topkWeights, int bufferId, int numExperts) {
    super(sd, topkWeights == null ? new SDVariable[] {x, topkIdx} : new SDVariable[] {x, topkIdx, topkWeights}, bufferId);
    addIArgument(numExperts, topkWeights != null ? 1 : 0);
  }

  /** Eager form, for {@code Nd4j.exec(op)}. */
  public EpDispatchOp(INDArray x, INDArray topkIdx, INDArray topkWeights, int bufferId, int numExperts) {
    super(topkWeights == null ? new INDArray[] {x, topkIdx} : new INDArray[] {x, topkIdx, topkWeights}, bufferId);
    addIArgument(numExperts, topkWeights != null ? 1 : 0);
  }

  @Override
  public String opName() {
    return "deepep4j_dispatch";
  }

  @Override
  public int getNumOutputs() {
    return weighted() ? 3 : 2;
  }

  private boolean weighted() {
    return attr(1) != 0;
  }

  private int numExperts() {
    return (int) attr(0);
  }

  /** The handle of the last completed run (null before the first). */
  public EpHandle handle() {
    return handle;
  }

  @Override
  public List<LongShapeDescriptor> shapes(INDArray[] in) {
    if (pending == null) pending = buffer().prepareDispatch(in[0], in[1], at(in, 2), numExperts());
    long m = pending.numRecvTokens();
    int k = pending.numTopk();
    return list(LongShapeDescriptor.fromShape(new long[] {m, pending.hidden()}, in[0].dataType()),
        LongShapeDescriptor.fromShape(new long[] {m, k}, DataType.LONG),
        weighted() ? LongShapeDescriptor.fromShape(new long[] {m, k}, DataType.FLOAT) : null);
  }

  @Override
  public INDArray[] run(INDArray[] in, INDArray[] out) {
    if (pending == null) shapes(in);
    EpHandle h = pending;
    pending = null;
    EpDispatchResult r = buffer().dispatchPrepared(h, in[0], at(in, 2), at(out, 0), at(out, 1), at(out, 2));
    if (handle != null) handle.close();
    handle = h;
    return weighted() ? new INDArray[] {r.recvX(), r.recvTopkIdx(), r.recvTopkWeights()} : new INDArray[] {r.recvX(), r.recvTopkIdx()};
  }

  @Override
  public List<DataType> calculateOutputDataTypes(List<DataType> in) {
    return weighted() ? Arrays.asList(in.get(0), DataType.LONG, DataType.FLOAT) : Arrays.asList(in.get(0), DataType.LONG);
  }

  /** d/dx = combine of d/d recvX along the cached handle; d/d topkWeights = d/d recvTopkWeights summed back home. */
  @Override
  public List<org.nd4j.autodiff.samediff.SDVariable> doDiff(List<SDVariable> grads) {
    SDVariable[] args = args();
    SDVariable gRecvW = weighted() ? grads.get(2) : null;
    SDVariable[] back = new EpDispatchBackOp(sameDiff, grads.get(0), gRecvW, this).outputVariables();
    List<SDVariable> g = new ArrayList<>();
    g.add(back[0]);
    g.add(sameDiff.zerosLike(args[1]));
    if (weighted()) g.add(back[1]);
    return g;
  }
}

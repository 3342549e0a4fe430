package org.deepep4j.samediff;

import java.util.Arrays;
import java.util.List;
import org.deepep4j.EpCombineResult;
import org.deepep4j.EpHandle;
import org.nd4j.autodiff.samediff.SDVariable;
import org.nd4j.autodiff.samediff.SameDiff;
import org.nd4j.linalg.api.buffer.DataType;
import org.nd4j.linalg.api.ndarray.INDArray;
import org.nd4j.linalg.api.shape.LongShapeDescriptor;

/**
 * Backward of {@link EpDispatchOp}: a combine along its cached handle. Inputs: d recvX [M, H], optional
 * d recvTopkWeights [M, K]. Outputs: d x [N, H] and, with weights, d topkWeights [N, K].
 */
public class EpDispatchBackOp extends EpCustomOp {

  public EpDispatchBackOp() {}

  EpDispatchBackOp(SameDiff sd, SDVariable gRecvX, SDVariable gRecvW, EpDispatchOp forward) {
    super(sd, gRecvW == null ? new SDVariable[] {gRecvX} : new SDVariable[] {gRecvX, gRecvW}, forward.getIArgument(0).intValue());
    addSArgument(forward.getOwnName());
    addIArgument(gRecvW != null ? 1 : 0);
  }

  private boolean weighted() {
    return attr(0) != 0;
  }

  @Override
  public String opName() {
    return "deepep4j_dispatch_bp";
  }

  @Override
  public int getNumOutputs() {
    return weighted() ? 2 : 1;
  }

  private EpHandle handle() {
    EpHandle h = dispatchOp().handle();
    if (h == null) throw new IllegalStateException("deepep4j_dispatch_bp: the forward dispatch has not run in this graph");
    return h;
  }

  @Override
  public List<LongShapeDescriptor> shapes(INDArray[] in) {
    EpHandle h = handle();
    return list(LongShapeDescriptor.fromShape(new long[] {h.numTokens(), h.hidden()}, in[0].dataType()),
        weighted() ? LongShapeDescriptor.fromShape(new long[] {h.numTokens(), h.numTopk()}, DataType.FLOAT) : null);
  }

  @Override
  public INDArray[] run(INDArray[] in, INDArray[] out) {
    EpHandle h = handle();
    INDArray gw = null;
    if (weighted()) {  // weights of experts on other ranks were not dispatched: their gradient is not ours to return
      INDArray local = h.recvTopkIdx().gte(0).castTo(DataType.FLOAT);
      gw = in[1].castTo(DataType.FLOAT).mul(local);
    }
    EpCombineResult r = buffer().combine(in[0], h, null, gw);
    return weighted() ? new INDArray[] {r.out(), r.outTopkWeights()} : new INDArray[] {r.out()};
  }

  @Override
  public List<DataType> calculateOutputDataTypes(List<DataType> in) {
    return weighted() ? Arrays.asList(in.get(0), DataType.FLOAT) : Arrays.asList(in.get(0));
  }
}

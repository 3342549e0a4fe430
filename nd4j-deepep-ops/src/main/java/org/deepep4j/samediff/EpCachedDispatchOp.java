package org.deepep4j.samediff;

import java.util.Collections;
import java.util.List;
import org.deepep4j.EpHandle;
import org.nd4j.autodiff.samediff.SDVariable;
import org.nd4j.autodiff.samediff.SameDiff;
import org.nd4j.linalg.api.buffer.DataType;
import org.nd4j.linalg.api.ndarray.INDArray;
import org.nd4j.linalg.api.shape.LongShapeDescriptor;

/** Backward of {@link EpCombineOp}: a dispatch of g [N, H] along the cached handle. Output: [M, H], dtype of g. */
public class EpCachedDispatchOp extends EpCustomOp {

  public EpCachedDispatchOp() {}

  EpCachedDispatchOp(SameDiff sd, SDVariable g, EpDispatchOp dispatch) {
    super(sd, new SDVariable[] {g}, dispatch.getIArgument(0).intValue());
    addSArgument(dispatch.getOwnName());
  }

  @Override
  public String opName() {
    return "deepep4j_cached_dispatch";
  }

  @Override
  public int getNumOutputs() {
    return 1;
  }

  private EpHandle handle() {
    EpHandle h = dispatchOp().handle();
    if (h == null) throw new IllegalStateException("deepep4j_cached_dispatch: the forward dispatch has not run in this graph");
    return h;
  }

  @Override
  public List<LongShapeDescriptor> shapes(INDArray[] in) {
    EpHandle h = handle();
    return list(LongShapeDescriptor.fromShape(new long[] {h.numRecvTokens(), h.hidden()}, in[0].dataType()));
  }

  @Override
  public INDArray[] run(INDArray[] in, INDArray[] out) {
    return new INDArray[] {buffer().dispatch(in[0], handle())};
  }

  @Override
  public List<DataType> calculateOutputDataTypes(List<DataType> in) {
    return Collections.singletonList(in.get(0));
  }
}

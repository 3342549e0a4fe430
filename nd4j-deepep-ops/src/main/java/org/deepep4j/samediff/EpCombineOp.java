package org.deepep4j.samediff;

import java.util.Arrays;
import java.util.Collections;
import java.util.List;
import org.deepep4j.EpHandle;
import org.nd4j.autodiff.samediff.SDVariable;
import org.nd4j.autodiff.samediff.SameDiff;
import org.nd4j.linalg.api.buffer.DataType;
import org.nd4j.linalg.api.ndarray.INDArray;
import org.nd4j.linalg.api.shape.LongShapeDescriptor;

/**
 * Combine as a graph op, along the handle of an {@link EpDispatchOp} of the same graph. Inputs: y [M, H], optional
 * recvTopkWeights [M, K] (weighted combine: row m scaled by the sum of its local weights). Output: [N, H], dtype of y.
 */
public class EpCombineOp extends EpCustomOp {

  public EpCombineOp() {}

  public EpCombineOp(SameDiff sd, SDVariable y, SDVariable recvTopkWeights, EpDispatchOp dispatch) {
    super(sd, recvTopkWeights == null ? new SDVariable[] {y} : new SDVariable[] {y, recvTopkWeights},
        dispatch.getIArgument(0).intValue());
    addSArgument(dispatch.getOwnName());
    addIArgument(recvTopkWeights != null ? 1 : 0);
  }

  private boolean weighted() {
    return attr(0) != 0;
  }

  @Override
  public String opName() {
    return "deepep4j_combine";
  }

  @Override
  public int getNumOutputs() {
    return 1;
  }

  private EpHandle handle() {
    EpHandle h = dispatchOp().handle();
    if (h == null) throw new IllegalStateException("deepep4j_combine: its dispatch has not run in this graph");
    return h;
  }

  @Override
  public List<LongShapeDescriptor> shapes(INDArray[] in) {
    EpHandle h = handle();
    return list(LongShapeDescriptor.fromShape(new long[] {h.numTokens(), h.hidden()}, in[0].dataType()));
  }

  @Override
  public INDArray[] run(INDArray[] in, INDArray[] out) {
    return new INDArray[] {buffer().combine(in[0], handle(), at(in, 1))};
  }

  @Override
  public List<DataType> calculateOutputDataTypes(List<DataType> in) {
    return Collections.singletonList(in.get(0));
  }

  /**
   * out[n] = sum over rows m of token n: s[m] y[m], s[m] = sum of row m's local weights (1 unweighted). So
   * d y[m] = s[m] g[n] with g[n] brought by a cached dispatch, and d w[m, j] = (y[m] . g[n]) where expert j is local.
   */
  @Override
  public List<SDVariable> doDiff(List<SDVariable> grads) {
    SDVariable gm = new EpCachedDispatchOp(sameDiff, grads.get(0), dispatchOp()).outputVariables()[0];
    if (!weighted()) return Collections.singletonList(gm);
    SDVariable y = arg(0);
    SDVariable w = arg(1);
    SDVariable local = dispatchOp().outputVariables()[1].gte(0.0).castTo(DataType.FLOAT);
    SDVariable s = w.mul(local).sum(true, 1);
    SDVariable gy = gm.mul(s.castTo(gm.dataType()));
    SDVariable dot = y.castTo(DataType.FLOAT).mul(gm.castTo(DataType.FLOAT)).sum(true, 1);
    return Arrays.asList(gy, dot.mul(local));
  }
}

package org.deepep4j.samediff;

import java.util.List;
import org.nd4j.linalg.api.ndarray.INDArray;
import org.nd4j.linalg.api.ops.CustomOp;
import org.nd4j.linalg.api.ops.OpContext;
import org.nd4j.linalg.api.shape.LongShapeDescriptor;
import org.nd4j.linalg.cpu.nativecpu.ops.NativeOpExecutioner;

/**
 * ND4J's CPU executioner plus the deepep4j ops. SameDiff 1.0.0-M2.1 runs custom ops by their libnd4j hash only, so
 * ours are caught here and run in Java; every other op goes to libnd4j unchanged. Selected with the system property
 * {@code opexec} before ND4J starts ({@link DeepEp#install()}).
 */
public class DeepEpExecutioner extends NativeOpExecutioner {
  @Override
  public INDArray[] exec(CustomOp op) {
    if (!(op instanceof EpCustomOp)) return super.exec(op);
    EpCustomOp e = (EpCustomOp) op;
    INDArray[] out = e.run(e.inputArguments().toArray(new INDArray[0]), e.outputArguments().toArray(new INDArray[0]));
    for (int i = 0; i < out.length; ++i) {
      if (i < e.numOutputArguments()) e.setOutputArgument(i, out[i]);
      else e.addOutputArgument(out[i]);
    }
    return out;
  }

  @Override
  public INDArray[] exec(CustomOp op, OpContext oc) {
    if (!(op instanceof EpCustomOp)) return super.exec(op, oc);
    INDArray[] out = ((EpCustomOp) op).run(oc.getInputArrays().toArray(new INDArray[0]), oc.getOutputArrays().toArray(new INDArray[0]));
    for (int i = 0; i < out.length; ++i) oc.setOutputArray(i, out[i]);
    return out;
  }

  @Override
  public List<LongShapeDescriptor> calculateOutputShape(CustomOp op) {
    if (op instanceof EpCustomOp) return ((EpCustomOp) op).calculateOutputShape();
    return super.calculateOutputShape(op);
  }

  @Override
  public List<LongShapeDescriptor> calculateOutputShape(CustomOp op, OpContext oc) {
    if (op instanceof EpCustomOp) return ((EpCustomOp) op).calculateOutputShape(oc);
    return super.calculateOutputShape(op, oc);
  }
}

package org.deepep4j.samediff;

import java.lang.reflect.Field;
import java.security.SecureRandom;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import org.nd4j.autodiff.functions.DifferentialFunction;
import org.nd4j.imports.converters.DifferentialFunctionClassHolder;
import org.deepep4j.EpBuffer;
import org.nd4j.autodiff.samediff.SDVariable;
import org.nd4j.autodiff.samediff.SameDiff;
import org.nd4j.linalg.api.ndarray.INDArray;
import org.nd4j.linalg.api.ops.DynamicCustomOp;
import org.nd4j.linalg.api.ops.OpContext;
import org.nd4j.linalg.api.shape.LongShapeDescriptor;

/**
 * Base of the deepep4j graph ops. libnd4j does not know them, so {@link DeepEpExecutioner} runs them in Java through
 * {@link #run} and sizes their outputs with {@link #shapes}. Attribute iArg 0 is the {@link EpBuffer#id()} of the
 * rank's buffer: each rank's graph names its own buffer. iArg 1 names the process that bound it, so a graph saved by
 * one process and loaded by another fails until {@link DeepEp#bind} points it at a buffer of this process. Ops that use a dispatch's handle name that dispatch op by
 * sArg 0, so the link survives SameDiff's graph cloning.
 */
public abstract class EpCustomOp extends DynamicCustomOp {
  protected EpCustomOp() {}

  /**
   * Names this process in iArg 1: a graph read from a file written by another process must be bound first. Within int
   * range: a full 64-bit value there made libnd4j 1.0.0-M2.1 abort (malloc: invalid size) while running the graph.
   */
  static final long PROCESS_TOKEN = 1 + new SecureRandom().nextInt(Integer.MAX_VALUE - 1);
  /** iArgs from here on are the op's own attributes (0: buffer id, 1: process token). */
  protected static final int FIRST_ATTR = 2;

  protected EpCustomOp(SameDiff sd, SDVariable[] args, int bufferId) {
    super(sd, args);
    addIArgument(bufferId, PROCESS_TOKEN);
  }

  protected EpCustomOp(INDArray[] inputs, int bufferId) {
    super(inputs, null);
    addIArgument(bufferId, PROCESS_TOKEN);
  }

  /** Points this op at {@code buf} (a graph read by {@code SameDiff.load}, or moved to another rank's buffer). */
  void bindTo(EpBuffer buf) {
    iArguments.set(0, (long) buf.id());
    iArguments.set(1, PROCESS_TOKEN);
  }

  protected long attr(int i) {
    return getIArgument(FIRST_ATTR + i);
  }

  /** SameDiff clones graphs through FlatBuffers when it builds gradients: the attributes live in iArgs/sArgs. */
  @Override
  public Map<String, Object> propertiesForFunction() {
    return new HashMap<>();
  }

  @Override
  public void setPropertiesForFunction(Map<String, Object> properties) {}

  @Override
  public void configureFromArguments() {}

  /** Lets SameDiff re-create these ops by hash when it clones a graph (libnd4j's table does not list them). */
  @SuppressWarnings("unchecked")
  static synchronized void registerClasses() {
    try {
      DifferentialFunctionClassHolder holder = DifferentialFunctionClassHolder.getInstance();
      Field f = DifferentialFunctionClassHolder.class.getDeclaredField("customOpHashToClass");
      f.setAccessible(true);
      Map<Long, Class<?>> byHash = (Map<Long, Class<?>>) f.get(holder);
      Field g = DifferentialFunctionClassHolder.class.getDeclaredField("customOpHashToClasses");
      g.setAccessible(true);
      Map<Long, Map<String, Class<?>>> byHashAndName = (Map<Long, Map<String, Class<?>>>) g.get(holder);
      for (EpCustomOp op : new EpCustomOp[] {new EpDispatchOp(), new EpDispatchBackOp(), new EpCombineOp(), new EpCachedDispatchOp()}) {
        byHash.put(op.opHash(), op.getClass());
        // the FlatBuffers writer records hash 0 for ops libnd4j does not list; the reader then looks up by name
        byHashAndName.computeIfAbsent(0L, k -> new HashMap<>()).put(op.opName(), op.getClass());
      }
    } catch (ReflectiveOperationException | RuntimeException e) {
      throw new IllegalStateException("cannot register the deepep4j ops with SameDiff 1.0.0-M2.1's op table: " + e, e);
    }
  }

  /** The dispatch op of this graph whose handle a combine or backward op uses (sArg 0 names it). */
  protected EpDispatchOp dispatchOp() {
    DifferentialFunction f = sameDiff == null ? null : sameDiff.getOpById(getSArgument(0));
    if (!(f instanceof EpDispatchOp))
      throw new IllegalStateException(opName() + ": dispatch op '" + getSArgument(0) + "' is not in this graph");
    return (EpDispatchOp) f;
  }

  protected EpBuffer buffer() {
    int id = getIArgument(0).intValue();
    if (getIArgument(1) != PROCESS_TOKEN)
      throw new IllegalStateException(opName() + " '" + getOwnName() + "': bound to EpBuffer " + id
          + " of another process (a graph read by SameDiff.load): call DeepEp.bind(sd, buffer) with this rank's EpBuffer before running it");
    try {
      return EpBuffer.byId(id);
    } catch (IllegalArgumentException e) {
      throw new IllegalStateException(opName() + " '" + getOwnName() + "': " + e.getMessage()
          + " (closed since the graph was built or saved): call DeepEp.bind(sd, buffer) with this rank's open EpBuffer", e);
    }
  }

  /** Computes the outputs; {@code outputs} (may be null or hold nulls) are written in place when they fit. */
  public abstract INDArray[] run(INDArray[] inputs, INDArray[] outputs);

  /** Output shapes for these inputs (dispatch exchanges its counts here: the row count M is known only after that). */
  public abstract List<LongShapeDescriptor> shapes(INDArray[] inputs);

  // libnd4j has no such op: never look it up by name.
  @Override
  public long opHash() {
    return opName().hashCode();
  }

  @Override
  public List<LongShapeDescriptor> calculateOutputShape() {
    return shapes(inputArguments().toArray(new INDArray[0]));
  }

  @Override
  public List<LongShapeDescriptor> calculateOutputShape(OpContext oc) {
    return shapes(oc.getInputArrays().toArray(new INDArray[0]));
  }

  static List<LongShapeDescriptor> list(LongShapeDescriptor... d) {
    List<LongShapeDescriptor> l = new ArrayList<>();
    for (LongShapeDescriptor x : d) if (x != null) l.add(x);
    return l;
  }

  static INDArray at(INDArray[] a, int i) {
    return a == null || i >= a.length ? null : a[i];
  }
}

package org.deepep4j.samediff;

import org.deepep4j.EpBuffer;
import org.nd4j.autodiff.samediff.SDVariable;
import org.nd4j.autodiff.samediff.SameDiff;
import org.nd4j.autodiff.samediff.internal.SameDiffOp;
import org.nd4j.linalg.api.ops.executioner.OpExecutioner;
import org.nd4j.linalg.factory.Nd4j;

/**
 * The deepep4j SameDiff namespace: {@code DeepEp.of(sd).dispatch(buf, x, topkIdx, topkWeights, numExperts)} and
 * {@code combine(...)}, both differentiable (grad of dispatch = combine with the cached handle, grad of combine =
 * dispatch). With R in-process ranks, build one graph per rank, each naming its rank's buffer, and run the R graphs
 * on R threads ({@code EpGroup.runOnAllRanks}). Call {@link #install()} before the first ND4J use.
 */
public final class DeepEp {
  private final SameDiff sd;

  private DeepEp(SameDiff sd) {
    this.sd = sd;
  }

  public static DeepEp of(SameDiff sd) {
    if (sd == null) throw new IllegalArgumentException("sd = null: pass the SameDiff graph to add the ops to");
    return new DeepEp(sd);
  }

  /**
   * Makes ND4J run the deepep4j ops ({@link DeepEpExecutioner}); must come before ND4J starts, since ND4J reads the
   * {@code opexec} property once. Fails naming the executioner when ND4J already runs with another one.
   */
  public static void install() {
    String mine = DeepEpExecutioner.class.getName();
    String set = System.getProperty("opexec");
    if (set != null && !set.equals(mine))
      throw new IllegalStateException("opexec = " + set + ": the deepep4j ops need opexec = " + mine);
    System.setProperty("opexec", mine);
    EpCustomOp.registerClasses();
    OpExecutioner e = Nd4j.getExecutioner();
    if (!(e instanceof DeepEpExecutioner))
      throw new IllegalStateException("ND4J already runs with executioner " + e.getClass().getName()
          + ": call DeepEp.install() before the first ND4J use, or start the JVM with -Dopexec=" + mine);
  }

  /**
   * Points every deepep4j op of {@code sd} (and of its gradient graph, if built) at {@code buf}, this rank's buffer.
   * A graph read by {@code SameDiff.load} names the buffer of the process that saved it: bind it before running it
   * (running it unbound fails naming the op and this call). Returns how many ops were bound.
   */
  public static int bind(SameDiff sd, EpBuffer buf) {
    if (sd == null) throw new IllegalArgumentException("sd = null: pass the SameDiff graph whose deepep4j ops to bind");
    if (buf == null) throw new IllegalArgumentException("buf = null: pass this rank's open EpBuffer");
    EpBuffer.byId(buf.id());  // fails naming the id when buf is closed
    int n = 0;
    for (SameDiff g : new SameDiff[] {sd, sd.getFunction("grad")}) {
      if (g == null) continue;
      for (SameDiffOp op : g.getOps().values())
        if (op.getOp() instanceof EpCustomOp) {
          ((EpCustomOp) op.getOp()).bindTo(buf);
          ++n;
        }
    }
    return n;
  }

  /** Dispatch of x [N, H] by topkIdx [N, K] (long) with optional topkWeights [N, K] (float) over buf's group. */
  public EpDispatchVars dispatch(EpBuffer buf, SDVariable x, SDVariable topkIdx, SDVariable topkWeights, int numExperts) {
    if (buf == null) throw new IllegalArgumentException("buf = null: pass this rank's EpBuffer");
    return new EpDispatchVars(new EpDispatchOp(sd, x, topkIdx, topkWeights, buf.id(), numExperts));
  }

  /** Sum back to [N, H] the rows y [M, H] of dispatch {@code d}. */
  public SDVariable combine(EpDispatchVars d, SDVariable y) {
    return combine(d, y, null);
  }

  /** As {@link #combine(EpDispatchVars, SDVariable)}, row m scaled by the sum of its local recvTopkWeights. */
  public SDVariable combine(EpDispatchVars d, SDVariable y, SDVariable recvTopkWeights) {
    if (d == null) throw new IllegalArgumentException("d = null: pass the EpDispatchVars of this graph's dispatch");
    return new EpCombineOp(sd, y, recvTopkWeights, d.op()).outputVariables()[0];
  }
}

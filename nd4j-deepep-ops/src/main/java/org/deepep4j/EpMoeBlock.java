package org.deepep4j;

import java.util.Arrays;
import org.bytedeco.javacpp.DoublePointer;
import org.bytedeco.javacpp.IntPointer;
import org.bytedeco.javacpp.Pointer;
import org.bytedeco.javacpp.PointerPointer;
import org.deepep4j.natives.DeepEp4jNative;
import org.nd4j.linalg.api.buffer.DataType;
import org.nd4j.linalg.api.ndarray.INDArray;
import org.nd4j.linalg.factory.Nd4j;

/**
 * The whole MoE block of one rank, run by the engine on its buffer's device: router (softmax or sigmoid, top-k) ->
 * dispatch -> the rank's SwiGLU experts -> weighted combine, the backward of all of it, and the experts' optimizer
 * step. Expert weights, gradients and optimizer state live in the engine (GPU memory on a CUDA buffer) across steps;
 * only activations, router weights and their gradients cross, as ND4J CPU arrays staged by the engine
 * ({@code memory = HOST}: through pinned memory with async copies on CUDA, in place on the CPU device).
 *
 * <p>{@link #create}, {@link #forward}, {@link #forwardAsync} and {@link #backward} are collective: every rank of the
 * buffer's group makes the same calls in the same order. {@link #read}, {@link #write} and {@link #step} are local.
 * Expert tensors are {@code numExperts / ranks} experts, each {@code W1 [H,F], W3 [H,F], W2 [F,H]} row-major, in that
 * order ({@link #tensorLength()} elements).
 */
public final class EpMoeBlock implements AutoCloseable {
  /** The block's per-expert tensors. GRADS are sums over tokens of the last backward, not yet scaled. */
  public enum Tensor { PARAMS, GRADS, STATE_M, STATE_V }

  private final EpBuffer buffer;
  private final EpMoeConfig config;
  private final long tensorLength;
  private final int localExperts;
  private DeepEp4jNative.Moe moe;
  private final DeepEp4jNative.MoeForwardArgs forwardArgs = new DeepEp4jNative.MoeForwardArgs();
  private final DeepEp4jNative.MoeBackwardArgs backwardArgs = new DeepEp4jNative.MoeBackwardArgs();
  private final DeepEp4jNative.Optimizer optimizer = new DeepEp4jNative.Optimizer();
  private final IntPointer expertLoad;
  private final IntPointer recvPerLocal;
  private final DoublePointer auxLoss = new DoublePointer(1);
  private Pending pending;
  private long lastTokens = -1;
  private Runnable beforeClose;

  private EpMoeBlock(EpBuffer buffer, EpMoeConfig config, DeepEp4jNative.Moe moe) {
    this.buffer = buffer;
    this.config = config;
    this.moe = moe;
    this.localExperts = config.numExperts() / buffer.numRanks();
    this.tensorLength = config.tensorLength(buffer.numRanks());
    this.expertLoad = new IntPointer(config.numExperts());
    this.recvPerLocal = new IntPointer(Math.max(1, localExperts));
  }

  /**
   * Collective: creates the block on {@code buffer} (its device, its ranks). Every rank must pass the same config
   * (a difference is an error on every rank naming the field). Weights start at zero: {@link #write} them. On CUDA
   * the engine loads cuBLAS; when it cannot, the error names the library.
   */
  public static EpMoeBlock create(EpBuffer buffer, EpMoeConfig config) {
    if (buffer == null) throw new IllegalArgumentException("buffer = null: an open EpBuffer is required");
    if (config == null) throw buffer.failStep("config = null: an EpMoeConfig is required");
    if (config.numExperts() % buffer.numRanks() != 0)
      throw buffer.failStep("numExperts = " + config.numExperts() + ": must be divisible by the buffer's "
          + buffer.numRanks() + " ranks");
    try (DeepEp4jNative.MoeConfig c = config.toNative(); PointerPointer<Pointer> out = new PointerPointer<>(1)) {
      buffer.collective(DeepEp4jNative.deepep4j_moe_create(buffer.nativeBuffer(), c, out), describe(buffer));
      EpMoeBlock block = new EpMoeBlock(buffer, config, new DeepEp4jNative.Moe(out.get(0)));
      buffer.track(block);
      return block;
    }
  }

  private static String describe(EpBuffer b) {
    return "MoE block of rank " + b.rank() + " on " + b.device() + (b.device() == EpDevice.CUDA ? " " + b.deviceId() : "");
  }

  public EpMoeConfig config() { return config; }
  public EpBuffer buffer() { return buffer; }
  public int localExperts() { return localExperts; }
  /** Elements of each {@link Tensor}: localExperts * 3 * H * F. */
  public long tensorLength() { return tensorLength; }

  /**
   * Runs {@code hook} once, first thing in {@link #close()} while the block can still be read (also when the buffer
   * closes it): an owner keeping host copies brings them up to date there.
   */
  public void beforeClose(Runnable hook) { this.beforeClose = hook; }

  /** True once {@link #close()} ran (directly or because the buffer closed). */
  public synchronized boolean isClosed() { return moe == null; }

  private DeepEp4jNative.Moe moe() {
    if (moe == null) throw new IllegalStateException("EpMoeBlock of rank " + buffer.rank() + ": already closed");
    return moe;
  }

  // ------------------------------------------------------------------------------------------------ tensors (local)

  /** Copies {@code tensor} into {@code host} (dense FLOAT or DOUBLE, {@link #tensorLength()} elements). */
  public void read(Tensor tensor, INDArray host) {
    int dtype = hostDtype("host", host);
    awaitPending();
    Status.check(DeepEp4jNative.deepep4j_moe_read(moe(), tensor.ordinal(), dtype, NativeArrays.address(host), tensorLength));
  }

  /** Copies {@code host} (FLOAT or DOUBLE, {@link #tensorLength()} elements, any layout) into {@code tensor}. */
  public void write(Tensor tensor, INDArray host) {
    if (host == null) throw new IllegalArgumentException("host = null: an array of " + tensorLength + " elements is required");
    INDArray h = NativeArrays.dense(host, host.dataType() == DataType.DOUBLE ? DataType.DOUBLE : DataType.FLOAT);
    int dtype = hostDtype("host", h);
    awaitPending();
    Status.check(DeepEp4jNative.deepep4j_moe_write(moe(), tensor.ordinal(), dtype, NativeArrays.address(h), tensorLength));
  }

  public float[] readFloats(Tensor tensor) {
    INDArray a = NativeArrays.create(DataType.FLOAT, tensorLength);
    read(tensor, a);
    return a.data().asFloat();
  }

  public double[] readDoubles(Tensor tensor) {
    INDArray a = NativeArrays.create(DataType.DOUBLE, tensorLength);
    read(tensor, a);
    return a.data().asDouble();
  }

  public void write(Tensor tensor, float[] host) {
    write(tensor, host == null ? null : Nd4j.createFromArray(host));
  }

  public void write(Tensor tensor, double[] host) {
    write(tensor, host == null ? null : Nd4j.createFromArray(host));
  }

  private int hostDtype(String name, INDArray a) {
    if (a == null) throw new IllegalArgumentException(name + " = null: an array of " + tensorLength + " elements is required");
    if (a.length() != tensorLength)
      throw new IllegalArgumentException(name + " length = " + a.length() + ": must be " + tensorLength + " (" + localExperts
          + " experts x 3 x " + config.hidden() + " x " + config.ffn() + ")");
    if (a.dataType() == DataType.FLOAT && NativeArrays.dense(a, DataType.FLOAT) == a) return DeepEp4jNative.DEEPEP4J_FLOAT32;
    if (a.dataType() == DataType.DOUBLE && NativeArrays.dense(a, DataType.DOUBLE) == a) return DeepEp4jNative.DEEPEP4J_FLOAT64;
    throw new IllegalArgumentException(name + " dtype = " + a.dataType() + ", order = " + a.ordering()
        + ": must be a dense C-order FLOAT or DOUBLE array");
  }

  // ------------------------------------------------------------------------------------------------ forward

  /**
   * Collective: {@code y = MoE(x)} for {@code x [N, H]} (cast to the block's dtype), router weights
   * {@code routerWeight [H, E]}, selection bias {@code routerBias [E]} (nullable; steers top-k, gets no gradient) and
   * {@code replayTopkIdx [N, K]} (nullable: recorded routing to reuse). Complete on return.
   */
  public EpMoeForward forward(INDArray x, INDArray routerWeight, INDArray routerBias, INDArray replayTopkIdx) {
    return forward(x, routerWeight, routerBias, replayTopkIdx, null);
  }

  /**
   * As {@link #forward(INDArray, INDArray, INDArray, INDArray)}, with y written into {@code y} [N, H] (the block's
   * dtype, dense C-order; null: a new array) and returned as the result's y. A caller that passes the same array
   * every step (DL4J's workspace memory, say) spares the host the first touch of fresh pages each step, which
   * otherwise bounds the staging of a GPU block. The rule: y is overwritten (the previous step's values are gone),
   * must not share memory with x, routerWeight, routerBias or replayTopkIdx (refused on every rank), and is complete
   * when the result is (on return here, at {@link Pending#await()} for {@link #forwardAsync}); a failed call leaves
   * it untouched on a GPU.
   */
  public EpMoeForward forward(INDArray x, INDArray routerWeight, INDArray routerBias, INDArray replayTopkIdx, INDArray y) {
    return start(x, routerWeight, routerBias, replayTopkIdx, y, false).await();
  }

  /**
   * Collective, asynchronous combine: returns once the step is queued; the outputs exist only through
   * {@link Pending#await()}, so nothing can read them before they are complete. Host work that does not need y (a
   * shared expert, say) goes between the two calls.
   */
  public Pending forwardAsync(INDArray x, INDArray routerWeight, INDArray routerBias, INDArray replayTopkIdx) {
    return forwardAsync(x, routerWeight, routerBias, replayTopkIdx, null);
  }

  /** {@link #forwardAsync(INDArray, INDArray, INDArray, INDArray)} into {@code y} (the rule of the 5-argument forward). */
  public Pending forwardAsync(INDArray x, INDArray routerWeight, INDArray routerBias, INDArray replayTopkIdx, INDArray y) {
    return start(x, routerWeight, routerBias, replayTopkIdx, y, true);
  }

  private synchronized Pending start(INDArray x, INDArray routerWeight, INDArray routerBias, INDArray replay, INDArray y,
                                     boolean async) {
    awaitPending();
    String bad = checkForward(x, routerWeight, routerBias, replay);
    if (bad == null) bad = EpBuffer.checkOutput("y", y, config.dataType(), x.size(0), config.hidden());
    if (bad == null) bad = EpBuffer.checkNoOverlap("y", y, x, routerWeight, routerBias, replay);
    if (bad != null) throw buffer.failStep(bad);
    DataType t = config.dataType();
    long n = x.size(0);
    int k = config.topK();
    Pending p = new Pending();
    p.x = NativeArrays.dense(x, t);
    p.wr = NativeArrays.dense(routerWeight, t);
    p.br = routerBias == null ? null : NativeArrays.dense(routerBias.reshape(routerBias.length()), DataType.FLOAT);
    p.replay = replay == null ? null : NativeArrays.dense(replay, DataType.LONG);
    p.y = y != null ? y : NativeArrays.create(t, n, config.hidden());
    p.topkIdx = NativeArrays.create(DataType.LONG, n, k);
    p.topkWeights = NativeArrays.create(DataType.FLOAT, n, k);
    forwardArgs.memory(DeepEp4jNative.DEEPEP4J_MEMORY_HOST).x(NativeArrays.address(p.x))
        .router_weight(NativeArrays.address(p.wr)).router_bias(NativeArrays.address(p.br))
        .replay_topk_idx(NativeArrays.address(p.replay)).y(NativeArrays.address(p.y))
        .topk_idx(NativeArrays.address(p.topkIdx)).topk_weights(NativeArrays.address(p.topkWeights))
        .async_combine(async ? 1 : 0).expert_load(expertLoad.address()).recv_per_local_expert(recvPerLocal.address())
        .aux_loss(auxLoss.address());
    buffer.collective(DeepEp4jNative.deepep4j_moe_forward(moe(), n, forwardArgs, 0L), null);
    lastTokens = n;
    p.async = async;
    pending = p;
    return p;
  }

  private String checkForward(INDArray x, INDArray wr, INDArray br, INDArray replay) {
    long h = config.hidden();
    int e = config.numExperts();
    if (x == null || x.rank() != 2 || x.size(1) != h)
      return "x shape = " + shapeOf(x) + ": must be [numTokens, " + h + "]";
    if (x.size(0) > config.maxTokens())
      return "x rows = " + x.size(0) + ": must be <= maxTokens = " + config.maxTokens();
    if (wr == null || wr.rank() != 2 || wr.size(0) != h || wr.size(1) != e)
      return "routerWeight shape = " + shapeOf(wr) + ": must be [" + h + ", " + e + "]";
    if (br != null && br.length() != e)
      return "routerBias shape = " + shapeOf(br) + ": must have " + e + " elements";
    if (replay != null && (replay.rank() != 2 || replay.size(0) != x.size(0) || replay.size(1) != config.topK()))
      return "replayTopkIdx shape = " + shapeOf(replay) + ": must be [" + x.size(0) + ", " + config.topK() + "]";
    return null;
  }

  /** Waits for an outstanding asynchronous forward, if any (its outputs stay in its {@link Pending}). */
  private void awaitPending() {
    if (pending != null && !pending.done) pending.await();
  }

  /** An asynchronous forward in flight; {@link #await()} completes it and hands out its outputs. */
  public final class Pending {
    private INDArray x, wr, br, replay, y, topkIdx, topkWeights;  // held until the engine is done with them
    private boolean async;
    private boolean done;
    private RuntimeException failure;
    private EpMoeForward result;

    private Pending() {}

    /** True once {@link #await()} has returned. */
    public boolean isDone() { return done; }

    /** Waits until the forward's outputs are complete and returns them (again on later calls). */
    public EpMoeForward await() {
      synchronized (EpMoeBlock.this) {
        if (failure != null) throw failure;
        if (done) return result;
        try {
          if (async) buffer.collective(DeepEp4jNative.deepep4j_moe_wait(moe()), null);
        } catch (RuntimeException ex) {
          failure = ex;
          done = true;
          throw ex;
        }
        int[] load = new int[config.numExperts()];
        expertLoad.get(load);
        int[] recv = new int[localExperts];
        recvPerLocal.get(recv);
        result = new EpMoeForward(y, topkIdx, topkWeights, load, recv, auxLoss.get());
        done = true;
        x = wr = br = replay = null;
        return result;
      }
    }
  }

  // ------------------------------------------------------------------------------------------------ backward, step

  /**
   * Collective: backward of the last forward for {@code gradY [N, H]}. The experts' gradients go to the block's
   * GRADS (overwritten, or added when {@code accumulate}); returns the gradients of x and of the router weights.
   * {@code auxLossScale} multiplies the aux loss's gradient (DL4J: the minibatch size, as DL4J divides later).
   */
  public EpMoeBackward backward(INDArray gradY, double auxLossScale, boolean accumulate) {
    return backward(gradY, auxLossScale, accumulate, null);
  }

  /**
   * As {@link #backward(INDArray, double, boolean)}, with the gradient of x written into {@code gradX} [N, H] (the
   * block's dtype, dense C-order; null: a new array), under the output rule of the 5-argument forward (it must not
   * share memory with gradY).
   */
  public synchronized EpMoeBackward backward(INDArray gradY, double auxLossScale, boolean accumulate, INDArray gradX) {
    awaitPending();
    String bad = null;
    if (lastTokens < 0) bad = "backward: no forward on this block to differentiate";
    else if (gradY == null || gradY.rank() != 2 || gradY.size(0) != lastTokens || gradY.size(1) != config.hidden())
      bad = "gradY shape = " + shapeOf(gradY) + ": must be [" + lastTokens + ", " + config.hidden() + "] (the last forward's x)";
    else if (!(auxLossScale >= 0) || !Double.isFinite(auxLossScale))
      bad = "auxLossScale = " + auxLossScale + ": must be finite and >= 0";
    if (bad == null) bad = EpBuffer.checkOutput("gradX", gradX, config.dataType(), lastTokens, config.hidden());
    if (bad == null) bad = EpBuffer.checkNoOverlap("gradX", gradX, gradY);
    if (bad != null) throw buffer.failStep(bad);
    DataType t = config.dataType();
    INDArray gy = NativeArrays.dense(gradY, t);
    INDArray gx = gradX != null ? gradX : NativeArrays.create(t, lastTokens, config.hidden());
    INDArray gwr = NativeArrays.create(t, config.hidden(), config.numExperts());
    backwardArgs.memory(DeepEp4jNative.DEEPEP4J_MEMORY_HOST).grad_y(NativeArrays.address(gy))
        .grad_x(NativeArrays.address(gx)).grad_router_weight(NativeArrays.address(gwr)).aux_loss_scale(auxLossScale)
        .accumulate(accumulate ? 1 : 0);
    buffer.collective(DeepEp4jNative.deepep4j_moe_backward(moe(), backwardArgs, 0L), null);
    return new EpMoeBackward(gx, gwr);
  }

  /** Local: one optimizer update of the experts from GRADS (and the moments), queued on the block's stream. */
  public synchronized void step(EpOptimizer opt) {
    if (opt == null) throw new IllegalArgumentException("opt = null: an EpOptimizer is required");
    awaitPending();
    opt.fill(optimizer);
    Status.check(DeepEp4jNative.deepep4j_moe_step(moe(), optimizer, 0L));
  }

  /**
   * Host-array staging since create (all zero on the CPU device, where host arrays are used in place): {bytes in,
   * bytes out, nanoseconds of host copies between the caller's arrays and pinned memory}.
   */
  public synchronized long[] stagingStats() {
    try (DeepEp4jNative.MoeStaging st = new DeepEp4jNative.MoeStaging()) {
      Status.check(DeepEp4jNative.deepep4j_moe_staging_stats(moe(), st));
      return new long[] {st.bytes_in(), st.bytes_out(), st.host_copy_ns()};
    }
  }

  private static String shapeOf(INDArray a) {
    return a == null ? "null" : Arrays.toString(a.shape());
  }

  /** Runs the {@link #beforeClose} hook, then frees the block's memory. Idempotent. */
  @Override
  public synchronized void close() {
    if (moe == null) return;
    try {
      if (pending != null && !pending.done) {
        try { pending.await(); } catch (RuntimeException ignored) { /* the forward's error was reported to its caller */ }
      }
      if (beforeClose != null) beforeClose.run();
    } finally {
      DeepEp4jNative.deepep4j_moe_destroy(moe);
      moe = null;
      buffer.untrack(this);
      forwardArgs.close();
      backwardArgs.close();
      optimizer.close();
      expertLoad.close();
      recvPerLocal.close();
      auxLoss.close();
    }
  }
}

package org.deepep4j;

import java.nio.charset.StandardCharsets;
import java.util.Arrays;
import org.bytedeco.javacpp.BytePointer;
import org.bytedeco.javacpp.IntPointer;
import org.bytedeco.javacpp.LongPointer;
import org.bytedeco.javacpp.Pointer;
import org.bytedeco.javacpp.PointerPointer;
import org.bytedeco.javacpp.SizeTPointer;
import org.deepep4j.natives.DeepEp4jNative;
import org.nd4j.linalg.api.buffer.DataType;
import org.nd4j.linalg.api.ndarray.INDArray;

/**
 * One rank's endpoint: dispatch sends each token's row to the ranks owning its top-k experts, combine brings the
 * expert outputs back and sums them per token in fp32. Every method except {@link #layout} is collective: all ranks
 * of the group make the same call (in process: each from its own thread). INDArrays on ND4J's CPU backend reach the
 * engine without copies when they are dense C-order; others are copied once. Outputs follow the input's dtype.
 */
public final class EpBuffer implements AutoCloseable {
  private final EpGroup group;
  private final int rank;
  private final EpConfig config;
  private DeepEp4jNative.Buffer buffer;
  private final DeepEp4jNative.DispatchArgs dispatchArgs = new DeepEp4jNative.DispatchArgs();
  private final DeepEp4jNative.CombineArgs combineArgs = new DeepEp4jNative.CombineArgs();
  private final PointerPointer<Pointer> handleOut = new PointerPointer<>(1);
  private final LongPointer numRecvOut = new LongPointer(1);
  private IntPointer perExpert = new IntPointer(64);  // reused: per-call native allocations cost more than the step
  private static final java.util.concurrent.atomic.AtomicInteger NEXT_ID = new java.util.concurrent.atomic.AtomicInteger(1);
  private static final java.util.Map<Integer, EpBuffer> OPEN = new java.util.concurrent.ConcurrentHashMap<>();
  private final int id = NEXT_ID.getAndIncrement();
  private final java.util.Set<EpHandle> liveHandles = java.util.concurrent.ConcurrentHashMap.newKeySet();
  /** Whether this rank's last collective call ended in an error: then every rank has seen that step fail. */
  private boolean lastStepFailed;

  private EpBuffer(EpGroup group, int rank, EpConfig config, DeepEp4jNative.Buffer buffer) {
    this.group = group;
    this.rank = rank;
    this.config = config;
    this.buffer = buffer;
    OPEN.put(id, this);
  }

  /** A number naming this open buffer in this JVM: graph ops carry it as an attribute to find their rank's buffer. */
  public int id() { return id; }

  /** The open buffer with this {@link #id()}; fails naming the id when it is unknown or closed. */
  public static EpBuffer byId(int id) {
    EpBuffer b = OPEN.get(id);
    if (b == null) throw new IllegalArgumentException("bufferId = " + id + ": no open EpBuffer has this id in this JVM");
    return b;
  }

  /** First byte of a rank's create blob: its buffer blob follows, or the reason it could not create its buffer. */
  private static final byte CREATED = 1, BAD_ARGUMENT = 2, FAILED = 3;

  /** Creates the native buffer, exchanges handle blobs through the group and connects. Every rank fails alike. */
  static EpBuffer create(EpGroup group, int rank, EpConfig config) {
    DeepEp4jNative.Buffer buf = null;
    byte[] mine;
    try (DeepEp4jNative.Config c = config.toNative(DeepEp4jNative.DEEPEP4J_DEVICE_CPU);
         PointerPointer<Pointer> out = new PointerPointer<>(1)) {
      int st = DeepEp4jNative.deepep4j_buffer_create(rank, group.size(), c, out);
      if (st == DeepEp4jNative.DEEPEP4J_OK) {
        buf = new DeepEp4jNative.Buffer(out.get(0));
        mine = exportBlob(buf);
      } else {
        mine = blob(st == DeepEp4jNative.DEEPEP4J_ERR_INVALID_ARGUMENT ? BAD_ARGUMENT : FAILED,
            describeCreateFailure(st, config).getBytes(StandardCharsets.UTF_8));
      }
    }
    // Every rank learns whether every rank could create its buffer before anyone connects.
    byte[][] all = group.allGather(rank, mine, config.timeout());
    for (int r = 0; r < all.length; ++r) {
      if (all[r][0] != CREATED) {
        if (buf != null) DeepEp4jNative.deepep4j_buffer_destroy(buf);
        String why = new String(all[r], 1, all[r].length - 1, StandardCharsets.UTF_8);
        String msg = r == rank ? why : "rank " + r + " could not create its EP buffer: " + why;
        if (all[r][0] == BAD_ARGUMENT) throw new IllegalArgumentException(msg);
        throw new IllegalStateException(msg);
      }
    }
    connect(buf, all);
    return new EpBuffer(group, rank, config, buf);
  }

  private static String describeCreateFailure(int st, EpConfig config) {
    String message = DeepEp4jNative.deepep4j_last_error().getString();
    if (st == DeepEp4jNative.DEEPEP4J_ERR_INVALID_ARGUMENT) return message;
    String name = DeepEp4jNative.deepep4j_status_name(st).getString();
    StringBuilder b = new StringBuilder(name).append(": ").append(message);
    if (st == DeepEp4jNative.DEEPEP4J_ERR_OUT_OF_MEMORY)
      b.append("; try a smaller bufferSizeGb (now ").append(config.bufferSizeGb()).append(")");
    if (config.dispatch() == EpDispatch.DEEPEP)
      b.append("; the DEEPEP dispatcher could not start. EpDispatch.ALLTOALL (NCCL all-to-all, CUDA only) is the explicit alternative: there is no automatic fallback");
    return b.toString();
  }

  private static byte[] exportBlob(DeepEp4jNative.Buffer buf) {
    try (BytePointer blob = new BytePointer(DeepEp4jNative.DEEPEP4J_MAX_BLOB_BYTES); SizeTPointer len = new SizeTPointer(1)) {
      int st = DeepEp4jNative.deepep4j_buffer_export(buf, blob, DeepEp4jNative.DEEPEP4J_MAX_BLOB_BYTES, len);
      if (st != DeepEp4jNative.DEEPEP4J_OK)
        return blob(FAILED, DeepEp4jNative.deepep4j_last_error().getString().getBytes(StandardCharsets.UTF_8));
      byte[] bytes = new byte[(int) len.get()];
      blob.get(bytes, 0, bytes.length);
      return blob(CREATED, bytes);
    }
  }

  private static byte[] blob(byte kind, byte[] payload) {
    byte[] out = new byte[payload.length + 1];
    out[0] = kind;
    System.arraycopy(payload, 0, out, 1, payload.length);
    return out;
  }

  private static void connect(DeepEp4jNative.Buffer buf, byte[][] all) {
    int n = all.length;
    BytePointer[] blobs = new BytePointer[n];
    try (PointerPointer<BytePointer> ptrs = new PointerPointer<>(n); SizeTPointer lens = new SizeTPointer(n)) {
      for (int r = 0; r < n; ++r) {
        blobs[r] = new BytePointer(all[r].length - 1);
        blobs[r].put(all[r], 1, all[r].length - 1);
        ptrs.put(r, blobs[r]);
        lens.put(r, all[r].length - 1);
      }
      int st = DeepEp4jNative.deepep4j_buffer_connect(buf, ptrs, lens);
      if (st != DeepEp4jNative.DEEPEP4J_OK) {
        String msg = DeepEp4jNative.deepep4j_last_error().getString();
        String name = DeepEp4jNative.deepep4j_status_name(st).getString();
        DeepEp4jNative.deepep4j_buffer_destroy(buf);
        if (st == DeepEp4jNative.DEEPEP4J_ERR_TIMEOUT) throw new EpTimeoutException(name + ": " + msg);
        throw new IllegalStateException(name + ": " + msg);
      }
    } finally {
      for (BytePointer b : blobs) if (b != null) b.close();
    }
  }

  public int rank() { return rank; }
  public int numRanks() { return group.size(); }
  public EpConfig config() { return config; }
  /** The device whose memory the buffer and its arrays use. */
  public EpDevice device() { return EpDevice.CPU; }
  public EpGroup group() { return group; }

  DeepEp4jNative.Buffer nativeBuffer() {
    if (buffer == null) throw new IllegalStateException("EpBuffer of rank " + rank + ": already closed");
    return buffer;
  }

  /** Throws on every rank: this rank joins the peers' step with its local failure. */
  private IllegalArgumentException failStep(String message) {
    lastStepFailed = true;
    DeepEp4jNative.deepep4j_fail_step(nativeBuffer(), DeepEp4jNative.DEEPEP4J_ERR_INVALID_ARGUMENT, message);
    return new IllegalArgumentException(message);
  }

  /** Status of a collective call: remembered (see {@link #joinStepWithFailure}), then thrown as an exception. */
  private void collective(int status) {
    lastStepFailed = status != DeepEp4jNative.DEEPEP4J_OK;
    Status.check(status);
  }

  /**
   * Collective: a rank that failed outside a collective call (in its own listener, on a bad batch) joins the step its
   * peers are making, or make next, with {@code message}; they stop with {@link EpPeerException} naming this rank
   * instead of waiting for it until the timeout. Does nothing when this rank's last collective call already ended in
   * an error, because every rank has seen that step fail. Returns when the peers have joined (or after the timeout).
   */
  public synchronized void joinStepWithFailure(String message) {
    if (lastStepFailed || buffer == null) return;
    lastStepFailed = true;
    DeepEp4jNative.deepep4j_fail_step(buffer, DeepEp4jNative.DEEPEP4J_ERR_INVALID_ARGUMENT,
        message == null ? "failed" : message);
  }

  /**
   * Collective: returns when every rank made this call; throws {@link EpPeerException} when a rank joined it with its
   * failure ({@link #joinStepWithFailure}). A run's closing step, so that no rank reports success while another failed.
   */
  public synchronized void barrier() {
    // an empty notify is the lightest collective step the engine has
    collective(DeepEp4jNative.deepep4j_notify_dispatch(nativeBuffer(), 0L, 0, 1, group.size(), 4,
        DeepEp4jNative.DEEPEP4J_FLOAT32, handleOut, numRecvOut, perExpert, 0L));
    DeepEp4jNative.deepep4j_handle_destroy(new DeepEp4jNative.Handle(handleOut.get(0)));
  }

  // ------------------------------------------------------------------------------------------------ layout (local)

  /** Local: tokens per rank, per expert, and the token-in-rank mask of {@code topkIdx} [N, K]. */
  public synchronized EpLayout layout(INDArray topkIdx, int numExperts) {
    if (topkIdx == null || topkIdx.rank() != 2)
      throw new IllegalArgumentException("topkIdx shape = " + shapeOf(topkIdx) + ": must be [numTokens, topK]");
    INDArray idx = NativeArrays.dense(topkIdx, DataType.LONG);
    int n = (int) idx.size(0);
    int k = (int) idx.size(1);
    int r = group.size();
    try (IntPointer perRank = new IntPointer(r); IntPointer perExpert = new IntPointer(Math.max(1, numExperts));
         BytePointer inRank = new BytePointer(Math.max(1L, (long) n * r))) {
      Status.check(DeepEp4jNative.deepep4j_get_dispatch_layout(nativeBuffer(), NativeArrays.address(idx), n, k, numExperts,
          perRank.address(), perExpert.address(), inRank.address(), 0L));
      int[] pr = new int[r];
      perRank.get(pr);
      int[] pe = new int[numExperts];
      perExpert.get(pe);
      boolean[][] mask = new boolean[n][r];
      for (int t = 0; t < n; ++t)
        for (int j = 0; j < r; ++j) mask[t][j] = inRank.get((long) t * r + j) != 0;
      return new EpLayout(pr, pe, mask);
    }
  }

  // ------------------------------------------------------------------------------------------------ dispatch

  /**
   * Collective: sends row n of {@code x} [N, H] to every rank owning one of {@code topkIdx}[n] (long, -1 = none),
   * with the matching {@code topkWeights} [N, K] (nullable). Experts are split evenly: rank r owns
   * [r * E / R, (r + 1) * E / R).
   */
  public synchronized EpDispatchResult dispatch(INDArray x, INDArray topkIdx, INDArray topkWeights, int numExperts) {
    EpHandle handle = prepareDispatch(x, topkIdx, topkWeights, numExperts);
    return dispatchPrepared(handle, x, topkWeights, null, null, null);
  }

  /**
   * Collective, first half of {@link #dispatch(INDArray, INDArray, INDArray, int)}: exchanges the counts and returns
   * the handle, whose {@link EpHandle#numRecvTokens()} is M, the row count of the outputs (graph engines size their
   * outputs with it). Finish with {@link #dispatchPrepared}.
   */
  public synchronized EpHandle prepareDispatch(INDArray x, INDArray topkIdx, INDArray topkWeights, int numExperts) {
    String bad = checkDispatch(x, topkIdx, topkWeights);
    if (bad != null) throw failStep(bad);
    INDArray idx = NativeArrays.dense(topkIdx, DataType.LONG);
    long n = x.size(0);
    long h = x.size(1);
    int k = (int) idx.size(1);
    int dtype = Dtypes.toNative(x.dataType(), "x");
    int localExperts = Math.max(1, numExperts / group.size());
    if (perExpert.capacity() < localExperts) {
      perExpert.close();
      perExpert = new IntPointer(localExperts);
    }
    collective(DeepEp4jNative.deepep4j_notify_dispatch(nativeBuffer(), NativeArrays.address(idx), n, k, numExperts, h,
        dtype, handleOut, numRecvOut, perExpert, 0L));
    int[] counts = new int[localExperts];
    perExpert.get(counts);
    EpHandle handle = new EpHandle(this, new DeepEp4jNative.Handle(handleOut.get(0)), n, numRecvOut.get(), k, numExperts, h, counts);
    liveHandles.add(handle);
    return handle;
  }

  /**
   * Collective, second half: moves the rows of {@code x} along the prepared handle. The outputs {@code recvX} [M, H],
   * {@code recvIdx} [M, K] long and {@code recvW} [M, K] float are written in place when given dense with the right
   * shape and type, else allocated. On failure the handle is closed.
   */
  public synchronized EpDispatchResult dispatchPrepared(EpHandle handle, INDArray x, INDArray topkWeights, INDArray recvX,
                                                        INDArray recvIdx, INDArray recvW) {
    INDArray xs = NativeArrays.dense(x, x.dataType());
    INDArray w = NativeArrays.dense(topkWeights, DataType.FLOAT);
    long m = handle.numRecvTokens();
    int k = handle.numTopk();
    int dtype = Dtypes.toNative(xs.dataType(), "x");
    recvX = NativeArrays.outputOrNew(recvX, xs.dataType(), m, handle.hidden());
    recvIdx = NativeArrays.outputOrNew(recvIdx, DataType.LONG, m, k);
    recvW = w == null ? null : NativeArrays.outputOrNew(recvW, DataType.FLOAT, m, k);
    dispatchArgs.x(NativeArrays.address(xs)).x_scales(0).topk_weights(NativeArrays.address(w))
        .recv_x(NativeArrays.address(recvX)).recv_x_scales(0).recv_topk_idx(NativeArrays.address(recvIdx))
        .recv_topk_weights(NativeArrays.address(recvW)).recv_src_token(0).recv_src_rank(0);
    try {
      collective(DeepEp4jNative.deepep4j_dispatch(nativeBuffer(), handle.nativeHandle(), dtype, dispatchArgs, 0L));
    } catch (RuntimeException e) {
      handle.close();
      throw e;
    }
    handle.recvTopkIdx = recvIdx;
    return new EpDispatchResult(recvX, recvIdx, recvW, handle);
  }

  /**
   * Collective, cached mode: sends {@code x} [N, H] along the routing of an earlier dispatch (the backward of
   * combine). Returns [M, H] in the dtype of x.
   */
  public synchronized INDArray dispatch(INDArray x, EpHandle cached) {
    String bad = checkRows("x", x, cached, cached == null ? 0 : cached.numTokens());
    if (bad != null) throw failStep(bad);
    INDArray xs = NativeArrays.dense(x, x.dataType());
    int dtype = Dtypes.toNative(xs.dataType(), "x");
    INDArray recvX = NativeArrays.create(xs.dataType(), cached.numRecvTokens(), cached.hidden());
    dispatchArgs.x(NativeArrays.address(xs)).x_scales(0).topk_weights(0).recv_x(NativeArrays.address(recvX))
        .recv_x_scales(0).recv_topk_idx(0).recv_topk_weights(0).recv_src_token(0).recv_src_rank(0);
    collective(DeepEp4jNative.deepep4j_dispatch(nativeBuffer(), cached.nativeHandle(), dtype, dispatchArgs, 0L));
    return recvX;
  }

  // ------------------------------------------------------------------------------------------------ combine

  /** Collective: out[n] = sum over the ranks token n visited of y's row for it. Returns [N, H], dtype of y. */
  public INDArray combine(INDArray y, EpHandle handle) {
    return combine(y, handle, null, null).out();
  }

  /**
   * Collective: as {@link #combine(INDArray, EpHandle)}, each row scaled by the sum of its local
   * {@code recvTopkWeights} [M, K] when that is given (nullable).
   */
  public INDArray combine(INDArray y, EpHandle handle, INDArray recvTopkWeights) {
    return combine(y, handle, recvTopkWeights, null).out();
  }

  /**
   * Collective, full form: also returns per-(token, k) values {@code yTopkWeights} [M, K] (zero where the expert is
   * not local) summed back to [N, K] — the gradient path of dispatched top-k weights.
   */
  public synchronized EpCombineResult combine(INDArray y, EpHandle handle, INDArray recvTopkWeights, INDArray yTopkWeights) {
    String bad = checkRows("y", y, handle, handle == null ? 0 : handle.numRecvTokens());
    if (bad == null) bad = checkTopk("recvTopkWeights", recvTopkWeights, handle);
    if (bad == null) bad = checkTopk("yTopkWeights", yTopkWeights, handle);
    if (bad != null) throw failStep(bad);
    INDArray ys = NativeArrays.dense(y, y.dataType());
    INDArray rw = NativeArrays.dense(recvTopkWeights, DataType.FLOAT);
    INDArray yw = NativeArrays.dense(yTopkWeights, DataType.FLOAT);
    int dtype = Dtypes.toNative(ys.dataType(), "y");
    INDArray out = NativeArrays.create(ys.dataType(), handle.numTokens(), handle.hidden());
    INDArray outW = yw == null ? null : NativeArrays.create(DataType.FLOAT, handle.numTokens(), handle.numTopk());
    combineArgs.y(NativeArrays.address(ys)).recv_topk_weights(NativeArrays.address(rw))
        .y_topk_weights(NativeArrays.address(yw)).out(NativeArrays.address(out)).out_topk_weights(NativeArrays.address(outW));
    collective(DeepEp4jNative.deepep4j_combine(nativeBuffer(), handle.nativeHandle(), dtype, combineArgs, 0L));
    return new EpCombineResult(out, outW);
  }

  // ------------------------------------------------------------------------------------------------ checks

  private String checkDispatch(INDArray x, INDArray topkIdx, INDArray topkWeights) {
    if (x == null || x.rank() != 2) return "x shape = " + shapeOf(x) + ": must be [numTokens, hidden]";
    if (topkIdx == null || topkIdx.rank() != 2) return "topkIdx shape = " + shapeOf(topkIdx) + ": must be [numTokens, topK]";
    if (topkIdx.size(0) != x.size(0))
      return "topkIdx shape = " + shapeOf(topkIdx) + ": must have x's " + x.size(0) + " rows (x shape = " + shapeOf(x) + ")";
    if (!topkIdx.dataType().isIntType()) return "topkIdx dtype = " + topkIdx.dataType() + ": must be an integer type (LONG)";
    if (topkWeights != null && !Arrays.equals(topkWeights.shape(), topkIdx.shape()))
      return "topkWeights shape = " + shapeOf(topkWeights) + ": must equal topkIdx shape " + shapeOf(topkIdx);
    if (topkWeights != null && !topkWeights.dataType().isFPType())
      return "topkWeights dtype = " + topkWeights.dataType() + ": must be floating point";
    return checkDtype("x", x);
  }

  private String checkRows(String name, INDArray a, EpHandle h, long rows) {
    if (h == null) return "handle = null: pass the EpHandle of a dispatch on this buffer";
    if (h.buffer() != this) return "handle: belongs to rank " + h.buffer().rank() + "'s buffer, not rank " + rank + "'s";
    if (h.isClosed()) return "handle: already closed";
    if (a == null || a.rank() != 2 || a.size(0) != rows || a.size(1) != h.hidden())
      return name + " shape = " + shapeOf(a) + ": must be [" + rows + ", " + h.hidden() + "] for this handle";
    return checkDtype(name, a);
  }

  private static String checkTopk(String name, INDArray a, EpHandle h) {
    if (a == null) return null;
    if (a.rank() != 2 || a.size(0) != h.numRecvTokens() || a.size(1) != h.numTopk())
      return name + " shape = " + shapeOf(a) + ": must be [" + h.numRecvTokens() + ", " + h.numTopk() + "]";
    return null;
  }

  private static String checkDtype(String name, INDArray a) {
    DataType t = a.dataType();
    if (t != DataType.FLOAT && t != DataType.BFLOAT16 && t != DataType.HALF)
      return name + " dtype = " + t + ": must be FLOAT, BFLOAT16 or HALF";
    return null;
  }

  private static String shapeOf(INDArray a) {
    return a == null ? "null" : Arrays.toString(a.shape());
  }

  void forget(EpHandle h) {
    liveHandles.remove(h);
  }

  /** Frees the handles still open, then the native buffer. */
  @Override
  public synchronized void close() {
    OPEN.remove(id);
    for (EpHandle h : liveHandles.toArray(new EpHandle[0])) h.close();
    if (buffer != null) {
      DeepEp4jNative.deepep4j_buffer_destroy(buffer);
      buffer = null;
    }
    dispatchArgs.close();
    combineArgs.close();
    handleOut.close();
    numRecvOut.close();
    perExpert.close();
  }
}

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
 * of the group make the same call (in process: each from its own thread). On the CPU device INDArrays of ND4J's CPU
 * backend reach the engine without copies when they are dense C-order (others are copied once). On a CUDA buffer the
 * same methods take the same host INDArrays: inputs are staged to the GPU and outputs back through pinned host memory
 * with async copies on the rank's own stream ({@link HostStaging}); callers who chain engine calls without leaving
 * the GPU use the overloads taking {@link EpDeviceArray}s instead. Outputs follow the input's dtype.
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
  private final java.util.Set<EpMoeBlock> liveBlocks = java.util.concurrent.ConcurrentHashMap.newKeySet();
  private final java.util.Set<EpDeviceArray> liveArrays = java.util.concurrent.ConcurrentHashMap.newKeySet();
  private final int deviceId;
  /** The rank's queue: its own stream on a GPU (no other rank shares it) and the pinned staging of host arrays. */
  private DeepEp4jNative.Queue queue;
  private long stream;
  /** Whether this rank's last collective call ended in an error: then every rank has seen that step fail. */
  private boolean lastStepFailed;
  /** Stream-ordered steps (CUDA deepep, config or its environment default): calls on device arrays only queue. */
  private final boolean streamOrdered;

  private EpBuffer(EpGroup group, int rank, EpConfig config, DeepEp4jNative.Buffer buffer, int deviceId,
                   DeepEp4jNative.Queue queue, boolean streamOrdered) {
    this.streamOrdered = streamOrdered;
    this.group = group;
    this.rank = rank;
    this.config = config;
    this.buffer = buffer;
    this.deviceId = deviceId;
    this.queue = queue;
    this.stream = queue == null ? 0L : DeepEp4jNative.deepep4j_queue_stream(queue);
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
    DeepEp4jNative.Queue queue = null;
    byte[] mine;
    boolean streamOrdered;
    boolean cuda = config.device() == EpDevice.CUDA;
    int deviceId = cuda ? cudaDeviceFor(group, rank) : 0;
    try (DeepEp4jNative.Config c = config.toNative(cuda ? DeepEp4jNative.DEEPEP4J_DEVICE_CUDA : DeepEp4jNative.DEEPEP4J_DEVICE_CPU);
         PointerPointer<Pointer> out = new PointerPointer<>(1)) {
      c.device_id(deviceId);
      streamOrdered = cuda && config.dispatch() == EpDispatch.DEEPEP && c.stream_ordered() == 1;
      String local = cuda ? checkCudaDevice(group, rank, deviceId) : null;
      int st = local != null ? DeepEp4jNative.DEEPEP4J_ERR_UNAVAILABLE : DeepEp4jNative.deepep4j_buffer_create(rank, group.size(), c, out);
      if (local != null) {
        mine = blob(FAILED, local.getBytes(StandardCharsets.UTF_8));
      } else if (st == DeepEp4jNative.DEEPEP4J_OK) {
        buf = new DeepEp4jNative.Buffer(out.get(0));
        // A GPU rank's queue is made here, where a failure still reaches every rank through the blob exchange.
        int qs = cuda ? DeepEp4jNative.deepep4j_queue_create(buf, out) : DeepEp4jNative.DEEPEP4J_OK;
        if (cuda && qs == DeepEp4jNative.DEEPEP4J_OK) queue = new DeepEp4jNative.Queue(out.get(0));
        mine = qs == DeepEp4jNative.DEEPEP4J_OK ? exportBlob(buf)
            : blob(FAILED, describeCreateFailure(qs, config).getBytes(StandardCharsets.UTF_8));
      } else {
        mine = blob(st == DeepEp4jNative.DEEPEP4J_ERR_INVALID_ARGUMENT ? BAD_ARGUMENT : FAILED,
            describeCreateFailure(st, config).getBytes(StandardCharsets.UTF_8));
      }
    }
    // Every rank learns whether every rank could create its buffer before anyone connects.
    byte[][] all = group.allGather(rank, mine, config.timeout());
    for (int r = 0; r < all.length; ++r) {
      if (all[r][0] != CREATED) {
        if (queue != null) DeepEp4jNative.deepep4j_queue_destroy(queue);
        if (buf != null) DeepEp4jNative.deepep4j_buffer_destroy(buf);
        String why = new String(all[r], 1, all[r].length - 1, StandardCharsets.UTF_8);
        String msg = r == rank ? why : "rank " + r + " could not create its EP buffer: " + why;
        if (all[r][0] == BAD_ARGUMENT) throw new IllegalArgumentException(msg);
        throw new IllegalStateException(msg);
      }
    }
    try {
      connect(buf, all);
    } catch (RuntimeException e) {
      if (queue != null) DeepEp4jNative.deepep4j_queue_destroy(queue);
      throw e;
    }
    return new EpBuffer(group, rank, config, buf, deviceId, queue, streamOrdered);
  }

  /**
   * The GPU of a rank: in-process groups put rank r on GPU r mod (visible GPUs), so several ranks may share one;
   * process groups use the process's LOCAL_RANK.
   */
  static int cudaDeviceFor(EpGroup group, int rank) {
    int count = DeepEp4jNative.deepep4j_cuda_device_count();
    if (group.isInProcess()) return count > 0 ? rank % count : 0;
    return group.localRank();
  }

  /** Why a CUDA buffer cannot be made here, in words, or null; the engine's own message covers the rest. */
  private static String checkCudaDevice(EpGroup group, int rank, int deviceId) {
    int count = DeepEp4jNative.deepep4j_cuda_device_count();
    if (count == 0)
      return "DEEPEP4J_ERR_UNAVAILABLE: device = CUDA for rank " + rank + ": the engine sees no CUDA device ("
          + "deepep4j_cuda_device_count() = 0: either libdeepep4j.so was built without the CUDA backend (no nvcc at "
          + "build time) or no GPU / driver is visible to this process). There is no CPU fallback: use EpDevice.CPU explicitly";
    if (deviceId >= count)
      return "DEEPEP4J_ERR_UNAVAILABLE: device = CUDA for rank " + rank + ": LOCAL_RANK = " + deviceId + " but only " + count
          + " CUDA devices are visible";
    return null;
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
  /** The device whose memory the buffer uses. */
  public EpDevice device() { return config.device(); }
  /** The CUDA ordinal of a CUDA buffer (0 on the CPU). */
  public int deviceId() { return deviceId; }
  public EpGroup group() { return group; }

  DeepEp4jNative.Buffer nativeBuffer() {
    if (buffer == null) throw new IllegalStateException("EpBuffer of rank " + rank + ": already closed");
    return buffer;
  }

  boolean isClosed() { return buffer == null; }

  /** The rank's queue (made with the buffer on a GPU; on the CPU device on first use, where it cannot fail). */
  synchronized DeepEp4jNative.Queue queue() {
    DeepEp4jNative.Buffer b = nativeBuffer();
    if (queue == null) {
      try (PointerPointer<Pointer> out = new PointerPointer<>(1)) {
        Status.check(DeepEp4jNative.deepep4j_queue_create(b, out), describe());
        queue = new DeepEp4jNative.Queue(out.get(0));
        stream = DeepEp4jNative.deepep4j_queue_stream(queue);
      }
    }
    return queue;
  }

  /** The stream of this rank's engine calls: its queue's own on a GPU, none (0) on the CPU. */
  private long stream() { return stream; }

  /** Whether steps are stream-ordered ({@link EpConfig.Builder#streamOrdered}): device-array calls only queue. */
  public boolean isStreamOrdered() { return streamOrdered; }

  /**
   * Local: waits until every call this rank queued (dispatch and combine on device arrays, copies) is complete, and
   * throws the error of a stream-ordered step that failed on the GPU (a peer's failure, a timeout); the buffer is
   * then broken (recreate the group's buffers). Returns at once on the CPU device.
   */
  public synchronized void sync() {
    if (queue != null) Status.check(DeepEp4jNative.deepep4j_queue_synchronize(queue), describe());
    awaitQueuedSteps();
  }

  /**
   * Stream-ordered buffers: waits for the rank's queued steps and throws the first error one recorded, before any of
   * their outputs is copied to the host (so a failed step leaves host outputs untouched). Nothing otherwise.
   */
  void awaitQueuedSteps() {
    if (!streamOrdered) return;
    int st = DeepEp4jNative.deepep4j_buffer_sync(nativeBuffer(), stream());
    if (st != DeepEp4jNative.DEEPEP4J_OK) {
      lastStepFailed = true;  // found on the device: every rank's step failed
      Status.check(st, describe());
    }
  }

  /** Which rank and device, for messages. */
  String describe() {
    return "rank " + rank + " on " + (config.device() == EpDevice.CUDA ? "GPU " + deviceId : "the CPU");
  }

  /** Throws on every rank: this rank joins the peers' step with its local failure. */
  IllegalArgumentException failStep(String message) {
    lastStepFailed = true;
    DeepEp4jNative.deepep4j_fail_step(nativeBuffer(), DeepEp4jNative.DEEPEP4J_ERR_INVALID_ARGUMENT, message);
    return new IllegalArgumentException(message);
  }

  /**
   * A local failure while preparing a collective call (staging memory, say) joins the peers' step with its message,
   * so they fail with {@link EpPeerException} instead of waiting; returns {@code e} to throw.
   */
  private RuntimeException joinStepWith(RuntimeException e) {
    lastStepFailed = true;
    DeepEp4jNative.deepep4j_fail_step(nativeBuffer(), e instanceof IllegalArgumentException
        ? DeepEp4jNative.DEEPEP4J_ERR_INVALID_ARGUMENT : DeepEp4jNative.DEEPEP4J_ERR_INTERNAL, String.valueOf(e.getMessage()));
    return e;
  }

  /** Status of a collective call: remembered (see {@link #joinStepWithFailure}), then thrown as an exception. */
  private void collective(int status) {
    collective(status, null);
  }

  /**
   * As {@link #collective(int)} for the other collective calls on this buffer (the MoE block's): a rank whose step
   * already failed everywhere must not join a further step with its failure, which no peer would come to.
   */
  void collective(int status, String context) {
    lastStepFailed = status != DeepEp4jNative.DEEPEP4J_OK;
    Status.check(status, context);
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
        DeepEp4jNative.DEEPEP4J_FLOAT32, handleOut, numRecvOut, perExpert, stream()));
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
         BytePointer inRank = new BytePointer(Math.max(1L, (long) n * r)); HostStaging io = new HostStaging(this)) {
      long idxAt = io.in(idx);
      long perRankAt = io.out(perRank.address(), 4L * r);
      long perExpertAt = io.out(perExpert.address(), 4L * Math.max(0, numExperts));
      long inRankAt = io.out(inRank.address(), (long) n * r);
      Status.check(DeepEp4jNative.deepep4j_get_dispatch_layout(nativeBuffer(), idxAt, n, k, numExperts, perRankAt,
          perExpertAt, inRankAt, stream()));
      io.finish();
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
    String bad = checkDispatch(ArrayMeta.of(x), ArrayMeta.of(topkIdx), ArrayMeta.of(topkWeights), false);
    if (bad != null) throw failStep(bad);
    INDArray idx = NativeArrays.dense(topkIdx, DataType.LONG);
    try (HostStaging io = new HostStaging(this)) {
      long idxAt;
      try {
        idxAt = io.in(idx);
      } catch (RuntimeException e) {
        throw joinStepWith(e);
      }
      return notify(idxAt, x.size(0), (int) idx.size(1), numExperts, x.size(1), Dtypes.toNative(x.dataType(), "x"));
    }
  }

  /** The collective count exchange of a dispatch: the handle of the step. */
  private EpHandle notify(long topkIdx, long n, int k, int numExperts, long h, int dtype) {
    int localExperts = Math.max(1, numExperts / group.size());
    if (perExpert.capacity() < localExperts) {
      perExpert.close();
      perExpert = new IntPointer(localExperts);
    }
    collective(DeepEp4jNative.deepep4j_notify_dispatch(nativeBuffer(), topkIdx, n, k, numExperts, h, dtype, handleOut,
        numRecvOut, perExpert, stream()));
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
    try (HostStaging io = new HostStaging(this)) {
      long xAt, wAt, recvXAt, recvIdxAt, recvWAt;
      try {
        xAt = io.in(xs);
        wAt = io.in(w);
        recvXAt = io.out(recvX);
        recvIdxAt = io.out(recvIdx);
        recvWAt = io.out(recvW);
      } catch (RuntimeException e) {
        handle.close();
        throw joinStepWith(e);
      }
      try {
        moveRows(handle, dtype, xAt, wAt, recvXAt, recvIdxAt, recvWAt);
        io.finish();
      } catch (RuntimeException e) {
        handle.close();
        throw e;
      }
    }
    handle.recvTopkIdx = recvIdx;
    return new EpDispatchResult(recvX, recvIdx, recvW, handle);
  }

  /** The collective dispatch call on engine addresses (device memory on a GPU). */
  private void moveRows(EpHandle handle, int dtype, long x, long topkWeights, long recvX, long recvIdx, long recvW) {
    dispatchArgs.x(x).x_scales(0).topk_weights(topkWeights).recv_x(recvX).recv_x_scales(0).recv_topk_idx(recvIdx)
        .recv_topk_weights(recvW).recv_src_token(0).recv_src_rank(0);
    collective(DeepEp4jNative.deepep4j_dispatch(nativeBuffer(), handle.nativeHandle(), dtype, dispatchArgs, stream()));
  }

  /**
   * Collective, cached mode: sends {@code x} [N, H] along the routing of an earlier dispatch (the backward of
   * combine). Returns [M, H] in the dtype of x.
   */
  public INDArray dispatch(INDArray x, EpHandle cached) {
    return dispatch(x, cached, null);
  }

  /**
   * Collective, cached mode into {@code recvX} [M, H] (x's dtype, dense C-order), written in place and returned;
   * null: a new array. The output rule of {@link #combine(INDArray, EpHandle, INDArray, INDArray, INDArray, INDArray)}
   * holds.
   */
  public synchronized INDArray dispatch(INDArray x, EpHandle cached, INDArray recvX) {
    String bad = checkRows("x", ArrayMeta.of(x), cached, cached == null ? 0 : cached.numTokens());
    if (bad == null) bad = checkOutput("recvX", recvX, x.dataType(), cached.numRecvTokens(), cached.hidden());
    if (bad == null) bad = checkNoOverlap("recvX", recvX, x);
    if (bad != null) throw failStep(bad);
    INDArray xs = NativeArrays.dense(x, x.dataType());
    recvX = recvX != null ? recvX : NativeArrays.create(xs.dataType(), cached.numRecvTokens(), cached.hidden());
    try (HostStaging io = new HostStaging(this)) {
      long xAt, recvXAt;
      try {
        xAt = io.in(xs);
        recvXAt = io.out(recvX);
      } catch (RuntimeException e) {
        throw joinStepWith(e);
      }
      moveRows(cached, Dtypes.toNative(xs.dataType(), "x"), xAt, 0, recvXAt, 0, 0);
      io.finish();
    }
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
  public EpCombineResult combine(INDArray y, EpHandle handle, INDArray recvTopkWeights, INDArray yTopkWeights) {
    return combine(y, handle, recvTopkWeights, yTopkWeights, null, null);
  }

  /**
   * Collective, full form into caller-provided outputs: {@code out} [N, H] of y's dtype and {@code outTopkWeights}
   * [N, K] FLOAT (given only with {@code yTopkWeights}), each dense C-order, written in place and returned in the
   * result; null: a new array. Reusing one output array step after step spares the host the first touch of fresh
   * pages each step (on a CUDA buffer that, not the transfer, bounds staged calls). The rule: an output is
   * overwritten by the call (the previous step's values in it are gone), must not share memory with any input of the
   * call (refused on every rank, naming it), and is complete when the call returns. A failed call leaves it untouched.
   */
  public synchronized EpCombineResult combine(INDArray y, EpHandle handle, INDArray recvTopkWeights, INDArray yTopkWeights,
                                              INDArray out, INDArray outTopkWeights) {
    String bad = checkRows("y", ArrayMeta.of(y), handle, handle == null ? 0 : handle.numRecvTokens());
    if (bad == null) bad = checkTopk("recvTopkWeights", ArrayMeta.of(recvTopkWeights), handle);
    if (bad == null) bad = checkTopk("yTopkWeights", ArrayMeta.of(yTopkWeights), handle);
    if (bad == null) bad = checkOutput("out", out, y.dataType(), handle.numTokens(), handle.hidden());
    if (bad == null && outTopkWeights != null && yTopkWeights == null)
      bad = "outTopkWeights: given without yTopkWeights (there is nothing to sum into it)";
    if (bad == null) bad = checkOutput("outTopkWeights", outTopkWeights, DataType.FLOAT, handle.numTokens(), handle.numTopk());
    if (bad == null) bad = checkNoOverlap("out", out, y, recvTopkWeights, yTopkWeights, outTopkWeights);
    if (bad == null) bad = checkNoOverlap("outTopkWeights", outTopkWeights, y, recvTopkWeights, yTopkWeights);
    if (bad != null) throw failStep(bad);
    INDArray ys = NativeArrays.dense(y, y.dataType());
    INDArray rw = NativeArrays.dense(recvTopkWeights, DataType.FLOAT);
    INDArray yw = NativeArrays.dense(yTopkWeights, DataType.FLOAT);
    int dtype = Dtypes.toNative(ys.dataType(), "y");
    out = out != null ? out : NativeArrays.create(ys.dataType(), handle.numTokens(), handle.hidden());
    INDArray outW = yw == null ? null
        : outTopkWeights != null ? outTopkWeights : NativeArrays.create(DataType.FLOAT, handle.numTokens(), handle.numTopk());
    try (HostStaging io = new HostStaging(this)) {
      long yAt, rwAt, ywAt, outAt, outWAt;
      try {
        yAt = io.in(ys);
        rwAt = io.in(rw);
        ywAt = io.in(yw);
        outAt = io.out(out);
        outWAt = io.out(outW);
      } catch (RuntimeException e) {
        throw joinStepWith(e);
      }
      reduceRows(handle, dtype, yAt, rwAt, ywAt, outAt, outWAt);
      io.finish();
    }
    return new EpCombineResult(out, outW);
  }

  /** The collective combine call on engine addresses (device memory on a GPU). */
  private void reduceRows(EpHandle handle, int dtype, long y, long recvW, long yW, long out, long outW) {
    combineArgs.y(y).recv_topk_weights(recvW).y_topk_weights(yW).out(out).out_topk_weights(outW);
    collective(DeepEp4jNative.deepep4j_combine(nativeBuffer(), handle.nativeHandle(), dtype, combineArgs, stream()));
  }

  // ------------------------------------------------------------------------------------------------ device arrays

  /** Uninitialised memory of {@code type} and {@code shape} on this buffer's device (host memory on the CPU). Local. */
  public synchronized EpDeviceArray allocate(DataType type, long... shape) {
    return EpDeviceArray.allocate(this, type, shape);
  }

  /** A device copy of {@code host} (same type and shape). Local; done on return. */
  public synchronized EpDeviceArray toDevice(INDArray host) {
    if (host == null) throw new IllegalArgumentException("host = null: toDevice needs an INDArray");
    EpDeviceArray a = allocate(host.dataType(), host.shape());
    try {
      a.copyFrom(host);
    } catch (RuntimeException e) {
      a.close();
      throw e;
    }
    return a;
  }

  /**
   * Collective: {@link #dispatch(INDArray, INDArray, INDArray, int)} on device arrays of this buffer ({@code topkIdx}
   * LONG, {@code topkWeights} FLOAT or null). The work is queued on the rank's stream; the received arrays are new
   * device arrays (the caller closes them). The handle's {@link EpHandle#recvTopkIdx()} is null: the ids are in the
   * result.
   */
  public synchronized EpDeviceDispatchResult dispatch(EpDeviceArray x, EpDeviceArray topkIdx, EpDeviceArray topkWeights,
                                                      int numExperts) {
    String bad = checkOwn("x", x);
    if (bad == null) bad = checkOwn("topkIdx", topkIdx);
    if (bad == null && topkWeights != null) bad = checkOwn("topkWeights", topkWeights);
    if (bad == null) bad = checkDispatch(ArrayMeta.of(x), ArrayMeta.of(topkIdx), ArrayMeta.of(topkWeights), true);
    if (bad != null) throw failStep(bad);
    long n = x.size(0), h = x.size(1);
    int k = (int) topkIdx.size(1);
    EpHandle handle = notify(topkIdx.address(), n, k, numExperts, h, Dtypes.toNative(x.dataType(), "x"));
    long m = handle.numRecvTokens();
    EpDeviceArray recvX = null, recvIdx = null, recvW = null;
    try {
      recvX = allocate(x.dataType(), m, h);
      recvIdx = allocate(DataType.LONG, m, k);
      if (topkWeights != null) recvW = allocate(DataType.FLOAT, m, k);
    } catch (RuntimeException e) {
      closeAll(recvX, recvIdx, recvW);
      handle.close();
      throw joinStepWith(e);
    }
    try {
      moveRows(handle, Dtypes.toNative(x.dataType(), "x"), x.address(), addressOf(topkWeights), recvX.address(),
          recvIdx.address(), addressOf(recvW));
    } catch (RuntimeException e) {
      closeAll(recvX, recvIdx, recvW);
      handle.close();
      throw e;
    }
    return new EpDeviceDispatchResult(recvX, recvIdx, recvW, handle);
  }

  /** Collective, cached mode on device arrays: {@code x} [N, H] along {@code cached}'s routing; a new [M, H] array. */
  public synchronized EpDeviceArray dispatch(EpDeviceArray x, EpHandle cached) {
    String bad = checkOwn("x", x);
    if (bad == null) bad = checkRows("x", ArrayMeta.of(x), cached, cached == null ? 0 : cached.numTokens());
    if (bad != null) throw failStep(bad);
    EpDeviceArray recvX = allocateInStep(x.dataType(), cached.numRecvTokens(), cached.hidden());
    try {
      moveRows(cached, Dtypes.toNative(x.dataType(), "x"), x.address(), 0, recvX.address(), 0, 0);
    } catch (RuntimeException e) {
      recvX.close();
      throw e;
    }
    return recvX;
  }

  /**
   * Collective: {@link #combine(INDArray, EpHandle, INDArray)} on device arrays of this buffer ({@code recvTopkWeights}
   * FLOAT [M, K] or null). Queued on the rank's stream; returns a new [N, H] device array of y's type.
   */
  public synchronized EpDeviceArray combine(EpDeviceArray y, EpHandle handle, EpDeviceArray recvTopkWeights) {
    String bad = checkOwn("y", y);
    if (bad == null && recvTopkWeights != null) bad = checkOwn("recvTopkWeights", recvTopkWeights);
    if (bad == null) bad = checkRows("y", ArrayMeta.of(y), handle, handle == null ? 0 : handle.numRecvTokens());
    if (bad == null) bad = checkTopk("recvTopkWeights", ArrayMeta.of(recvTopkWeights), handle);
    if (bad == null && recvTopkWeights != null && recvTopkWeights.dataType() != DataType.FLOAT)
      bad = "recvTopkWeights dtype = " + recvTopkWeights.dataType() + ": a device array must be FLOAT";
    if (bad != null) throw failStep(bad);
    EpDeviceArray out = allocateInStep(y.dataType(), handle.numTokens(), handle.hidden());
    try {
      reduceRows(handle, Dtypes.toNative(y.dataType(), "y"), y.address(), addressOf(recvTopkWeights), 0, out.address(), 0);
    } catch (RuntimeException e) {
      out.close();
      throw e;
    }
    return out;
  }

  /** An output of a collective call: a failure to allocate it joins the peers' step, so they do not wait for us. */
  private EpDeviceArray allocateInStep(DataType type, long... shape) {
    try {
      return allocate(type, shape);
    } catch (RuntimeException e) {
      throw joinStepWith(e);
    }
  }

  private static long addressOf(EpDeviceArray a) { return a == null ? 0L : a.address(); }

  private static void closeAll(EpDeviceArray... arrays) {
    for (EpDeviceArray a : arrays) if (a != null) a.close();
  }

  // ------------------------------------------------------------------------------------------------ checks

  private String checkOwn(String name, EpDeviceArray a) {
    if (a == null) return name + " = null: a device array of this buffer is required";
    if (a.buffer() != this)
      return name + ": a device array of rank " + a.buffer().rank() + "'s buffer, not of rank " + rank + "'s";
    if (a.isClosed()) return name + ": device array already closed";
    return null;
  }

  /** Device arrays are not cast: their types must be exact (ND4J arrays are converted on the host). */
  private String checkDispatch(ArrayMeta x, ArrayMeta topkIdx, ArrayMeta topkWeights, boolean exactTypes) {
    if (x == null || x.rank() != 2) return "x shape = " + ArrayMeta.shapeOf(x) + ": must be [numTokens, hidden]";
    if (topkIdx == null || topkIdx.rank() != 2)
      return "topkIdx shape = " + ArrayMeta.shapeOf(topkIdx) + ": must be [numTokens, topK]";
    if (topkIdx.size(0) != x.size(0))
      return "topkIdx shape = " + ArrayMeta.shapeOf(topkIdx) + ": must have x's " + x.size(0) + " rows (x shape = "
          + ArrayMeta.shapeOf(x) + ")";
    if (!topkIdx.type().isIntType()) return "topkIdx dtype = " + topkIdx.type() + ": must be an integer type (LONG)";
    if (exactTypes && topkIdx.type() != DataType.LONG)
      return "topkIdx dtype = " + topkIdx.type() + ": a device array must be LONG";
    if (topkWeights != null && !Arrays.equals(topkWeights.shape(), topkIdx.shape()))
      return "topkWeights shape = " + ArrayMeta.shapeOf(topkWeights) + ": must equal topkIdx shape " + ArrayMeta.shapeOf(topkIdx);
    if (topkWeights != null && !topkWeights.type().isFPType())
      return "topkWeights dtype = " + topkWeights.type() + ": must be floating point";
    if (exactTypes && topkWeights != null && topkWeights.type() != DataType.FLOAT)
      return "topkWeights dtype = " + topkWeights.type() + ": a device array must be FLOAT";
    return checkDtype("x", x);
  }

  private String checkRows(String name, ArrayMeta a, EpHandle h, long rows) {
    if (h == null) return "handle = null: pass the EpHandle of a dispatch on this buffer";
    if (h.buffer() != this) return "handle: belongs to rank " + h.buffer().rank() + "'s buffer, not rank " + rank + "'s";
    if (h.isClosed()) return "handle: already closed";
    if (a == null || a.rank() != 2 || a.size(0) != rows || a.size(1) != h.hidden())
      return name + " shape = " + ArrayMeta.shapeOf(a) + ": must be [" + rows + ", " + h.hidden() + "] for this handle";
    return checkDtype(name, a);
  }

  private static String checkTopk(String name, ArrayMeta a, EpHandle h) {
    if (a == null) return null;
    if (a.rank() != 2 || a.size(0) != h.numRecvTokens() || a.size(1) != h.numTopk())
      return name + " shape = " + ArrayMeta.shapeOf(a) + ": must be [" + h.numRecvTokens() + ", " + h.numTopk() + "]";
    return null;
  }

  /** A caller-provided output: null (allocate one), or dense C-order of exactly this type and shape. */
  static String checkOutput(String name, INDArray out, DataType type, long... shape) {
    if (out == null) return null;
    if (out.dataType() != type || !Arrays.equals(out.shape(), shape))
      return name + " = " + out.dataType() + Arrays.toString(out.shape()) + ": an output must be " + type
          + Arrays.toString(shape);
    if (out.length() > 0 && NativeArrays.dense(out, type) != out)
      return name + ": an output must be dense C-order (it is written in place), not a view with strides or order '"
          + out.ordering() + "'";
    return null;
  }

  /** An output that shares memory with an input would be read while written: refused. */
  static String checkNoOverlap(String name, INDArray out, INDArray... inputs) {
    if (out == null || out.length() == 0) return null;
    long o0 = NativeArrays.address(out), o1 = o0 + out.length() * out.data().getElementSize();
    for (INDArray in : inputs) {
      // an input that is not dense C-order is copied before the call, so only dense ones can alias
      if (in == null || in.length() == 0 || NativeArrays.dense(in, in.dataType()) != in) continue;
      long i0 = NativeArrays.address(in), i1 = i0 + in.length() * in.data().getElementSize();
      if (o0 < i1 && i0 < o1)
        return name + ": shares memory with an input of the call (" + in.dataType() + Arrays.toString(in.shape())
            + "); an output must not alias an input";
    }
    return null;
  }

  private static String checkDtype(String name, ArrayMeta a) {
    DataType t = a.type();
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

  void track(EpMoeBlock b) {
    liveBlocks.add(b);
  }

  void untrack(EpMoeBlock b) {
    liveBlocks.remove(b);
  }

  void track(EpDeviceArray a) {
    liveArrays.add(a);
  }

  void untrack(EpDeviceArray a) {
    liveArrays.remove(a);
  }

  /** Frees the handles still open, then the native buffer. */
  @Override
  public synchronized void close() {
    OPEN.remove(id);
    for (EpMoeBlock b : liveBlocks.toArray(new EpMoeBlock[0])) b.close();  // blocks first: they live on this buffer
    for (EpHandle h : liveHandles.toArray(new EpHandle[0])) h.close();
    for (EpDeviceArray a : liveArrays.toArray(new EpDeviceArray[0])) a.close();
    if (queue != null) {  // waits for the rank's queued work, then frees its stream and staging
      DeepEp4jNative.deepep4j_queue_destroy(queue);
      queue = null;
      stream = 0;
    }
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

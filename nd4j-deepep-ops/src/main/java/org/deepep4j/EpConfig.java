package org.deepep4j;

import java.time.Duration;
import java.util.Objects;
import org.deepep4j.natives.DeepEp4jNative;

/**
 * Immutable settings of an {@link EpBuffer}. Every invalid value is an {@link IllegalArgumentException} naming the
 * setting, the value and the rule.
 *
 * <pre>{@code
 * EpConfig cfg = EpConfig.builder().dispatch(EpDispatch.DEEPEP).bufferSizeGb(0.5).numSms(20).build();
 * }</pre>
 */
public final class EpConfig {
  private final EpDispatch dispatch;
  private final double bufferSizeGb;
  private final int numSms;
  private final Duration timeout;
  private final int maxSendTokensPerChunk;
  private final int ringTokens;
  private final int threads;
  private final EpDevice device;
  private final CudaTransfer cudaTransfer;
  private final int ceChunks;
  private final Boolean cudaTrace;
  private final Boolean cpuDirect;
  private final Boolean streamOrdered;
  private final int hostCopyThreads;

  /** How the CUDA deepep backend moves rows (C {@code deepep4j_cuda_transfer}). */
  public enum CudaTransfer {
    /** Copy engines when every rank's step fits its landing zones and moves >= 8 MiB to or from a peer, else rings. */
    AUTO(DeepEp4jNative.DEEPEP4J_CUDA_TRANSFER_AUTO),
    /** Always the SM ring kernels. */
    SM(DeepEp4jNative.DEEPEP4J_CUDA_TRANSFER_SM),
    /** Copy engines; a step that does not fit {@code bufferBytes / ranks} per source fails naming buffer_bytes. */
    COPY_ENGINE(DeepEp4jNative.DEEPEP4J_CUDA_TRANSFER_COPY_ENGINE);

    final int nativeValue;

    CudaTransfer(int v) { nativeValue = v; }
  }

  private EpConfig(Builder b) {
    device = b.device;
    dispatch = b.dispatch;
    bufferSizeGb = b.bufferSizeGb;
    numSms = b.numSms;
    timeout = b.timeout;
    maxSendTokensPerChunk = b.maxSendTokensPerChunk;
    ringTokens = b.ringTokens;
    threads = b.threads;
    cudaTransfer = b.cudaTransfer;
    ceChunks = b.ceChunks;
    cudaTrace = b.cudaTrace;
    cpuDirect = b.cpuDirect;
    streamOrdered = b.streamOrdered;
    hostCopyThreads = b.hostCopyThreads;
  }

  public static Builder builder() {
    return new Builder();
  }

  /** The defaults: DEEPEP, 2.0 GB, 20 SMs, 60 s timeout. */
  public static EpConfig defaults() {
    return builder().build();
  }

  public Builder toBuilder() {
    Builder b = new Builder();
    b.dispatch = dispatch;
    b.bufferSizeGb = bufferSizeGb;
    b.numSms = numSms;
    b.timeout = timeout;
    b.maxSendTokensPerChunk = maxSendTokensPerChunk;
    b.ringTokens = ringTokens;
    b.threads = threads;
    b.device = device;
    b.cudaTransfer = cudaTransfer;
    b.ceChunks = ceChunks;
    b.cudaTrace = cudaTrace;
    b.cpuDirect = cpuDirect;
    b.streamOrdered = streamOrdered;
    b.hostCopyThreads = hostCopyThreads;
    return b;
  }

  public EpDispatch dispatch() { return dispatch; }
  public double bufferSizeGb() { return bufferSizeGb; }
  public long bufferBytes() { return (long) (bufferSizeGb * (1L << 30)); }
  public int numSms() { return numSms; }
  public Duration timeout() { return timeout; }
  public int maxSendTokensPerChunk() { return maxSendTokensPerChunk; }
  public int ringTokens() { return ringTokens; }
  public int threads() { return threads; }
  /** Where the buffer lives: CPU (default) or CUDA (rank r on GPU r mod count in process, LOCAL_RANK across processes). */
  public EpDevice device() { return device; }
  /** The CUDA transfer mode, or null for the engine's default (auto, or env {@code DEEPEP4J_CUDA_TRANSFER}). */
  public CudaTransfer cudaTransfer() { return cudaTransfer; }
  /** Copy-engine copies per peer and step, or 0 for the engine's default (4, or env {@code DEEPEP4J_CE_CHUNKS}). */
  public int ceChunks() { return ceChunks; }
  /** Per-step copy-engine timing on stderr, or null for the engine's default (env {@code DEEPEP4J_CUDA_TRACE}). */
  public Boolean cudaTrace() { return cudaTrace; }
  /** CPU direct copies between ranks of one process, or null for the default (on; env {@code DEEPEP4J_CPU_DIRECT}). */
  public Boolean cpuDirect() { return cpuDirect; }
  /** Stream-ordered steps, or null for the engine's default (off; env {@code DEEPEP4J_STREAM_ORDERED}). */
  public Boolean streamOrdered() { return streamOrdered; }
  /** Threads copying host arrays to and from pinned staging per rank, or 0 for automatic (cores / ranks, <= 8). */
  public int hostCopyThreads() { return hostCopyThreads; }

  /**
   * Recommended buffer (in GB) for rows of {@code hidden} elements of {@code dtype} on {@code numRanks} ranks: room for
   * this config's full ring depth ({@code ringTokens} slots per ring, any top-k up to 32), as
   * {@code deepep4j_buffer_size_hint} computes it. A step also runs with less (down to one chunk per ring:
   * {@code deepep4j_buffer_size_min}), more slowly.
   */
  public double bufferSizeHintGb(long hidden, org.nd4j.linalg.api.buffer.DataType dtype, int numRanks) {
    try (DeepEp4jNative.Config c = toNative(0);
         org.bytedeco.javacpp.LongPointer out = new org.bytedeco.javacpp.LongPointer(1)) {
      Status.check(DeepEp4jNative.deepep4j_buffer_size_hint(hidden, Dtypes.toNative(dtype, "dtype"), numRanks, c, out));
      return out.get() / (double) (1L << 30);
    }
  }

  DeepEp4jNative.Config toNative(int device) {
    DeepEp4jNative.Config c = new DeepEp4jNative.Config();
    DeepEp4jNative.deepep4j_config_init(c);
    c.buffer_bytes(bufferBytes())
        .num_sms(numSms)
        .max_send_tokens_per_chunk(maxSendTokensPerChunk)
        .ring_tokens(ringTokens)
        .timeout_ms((int) Math.min(Integer.MAX_VALUE, timeout.toMillis()))
        .device(device)
        .backend(dispatch == EpDispatch.DEEPEP ? DeepEp4jNative.DEEPEP4J_BACKEND_DEEPEP
                                               : DeepEp4jNative.DEEPEP4J_BACKEND_ALLTOALL)
        .num_threads(threads)
        .host_copy_threads(hostCopyThreads);
    // Unset settings keep deepep4j_config_init's defaults (which the environment may give).
    if (cudaTransfer != null) c.cuda_transfer(cudaTransfer.nativeValue);
    if (ceChunks != 0) c.ce_chunks(ceChunks);
    if (cudaTrace != null) c.cuda_trace(cudaTrace ? 1 : 0);
    if (cpuDirect != null) c.cpu_direct(cpuDirect ? 1 : 0);
    if (streamOrdered != null) c.stream_ordered(streamOrdered ? 1 : 0);
    return c;
  }

  @Override
  public String toString() {
    return "EpConfig{dispatch=" + dispatch + ", bufferSizeGb=" + bufferSizeGb + ", numSms=" + numSms
        + ", timeout=" + timeout + ", maxSendTokensPerChunk="
        + maxSendTokensPerChunk + ", ringTokens=" + ringTokens + ", threads=" + threads + ", cudaTransfer="
        + cudaTransfer + ", ceChunks=" + ceChunks + ", cudaTrace=" + cudaTrace + ", cpuDirect=" + cpuDirect + ", streamOrdered=" + streamOrdered + ", hostCopyThreads=" + hostCopyThreads
        + ", device=" + device + "}";
  }

  /** Builder with validation at each setter. */
  public static final class Builder {
    private EpDispatch dispatch = EpDispatch.DEEPEP;
    private double bufferSizeGb = 2.0;
    private int numSms = 20;
    private Duration timeout = Duration.ofSeconds(60);
    private int maxSendTokensPerChunk = 16;
    private int ringTokens = 128;
    private int threads = 0;
    private EpDevice device = EpDevice.CPU;
    private CudaTransfer cudaTransfer = null;
    private int ceChunks = 0;
    private Boolean cudaTrace = null;
    private Boolean cpuDirect = null;
    private Boolean streamOrdered = null;
    private int hostCopyThreads = 0;

    private Builder() {}

    /**
     * CPU (default) or CUDA. CUDA where the engine has no CUDA backend or sees no GPU fails at buffer creation with
     * the engine's words; there is no CPU fallback.
     */
    public Builder device(EpDevice d) {
      this.device = Objects.requireNonNull(d, "device = null: must be CPU or CUDA");
      return this;
    }

    /** DEEPEP (default) or ALLTOALL. */
    public Builder dispatch(EpDispatch d) {
      this.dispatch = Objects.requireNonNull(d, "dispatch = null: must be DEEPEP or ALLTOALL");
      return this;
    }

    /** Receive buffer per rank in GB (default 2.0); a step larger than it is sent in chunks. */
    public Builder bufferSizeGb(double gb) {
      if (!(gb > 0) || gb > 1024 || Double.isNaN(gb))
        throw new IllegalArgumentException("bufferSizeGb = " + gb + ": must be > 0 and <= 1024");
      if (gb * (1L << 30) < 4096)
        throw new IllegalArgumentException("bufferSizeGb = " + gb + ": must be at least 4096 bytes (" + 4096.0 / (1L << 30) + " GB)");
      this.bufferSizeGb = gb;
      return this;
    }

    /** SMs for the transfer (default 20): even, >= 2; channels = numSms / 2. */
    public Builder numSms(int n) {
      if (n < 2 || n % 2 != 0 || n > 256)
        throw new IllegalArgumentException("numSms = " + n + ": must be even and in [2, 256] (each channel is a sender and a receiver SM)");
      this.numSms = n;
      return this;
    }

    /** Longest wait of any collective step (default 60 s): positive, at most 24 days. */
    public Builder timeout(Duration t) {
      if (t == null || t.isNegative() || t.isZero() || t.toMillis() > Integer.MAX_VALUE)
        throw new IllegalArgumentException("timeout = " + t + ": must be positive and at most " + Integer.MAX_VALUE + " ms");
      this.timeout = t;
      return this;
    }

    /** Rows a sender publishes at a time (default 16): >= 1. */
    public Builder maxSendTokensPerChunk(int n) {
      if (n < 1) throw new IllegalArgumentException("maxSendTokensPerChunk = " + n + ": must be >= 1");
      this.maxSendTokensPerChunk = n;
      return this;
    }

    /** Slots per (channel, peer) ring (default 128): >= maxSendTokensPerChunk (checked at build). */
    public Builder ringTokens(int n) {
      if (n < 1) throw new IllegalArgumentException("ringTokens = " + n + ": must be >= 1");
      this.ringTokens = n;
      return this;
    }

    /** CPU copy threads per rank (default 0 = cores / ranks). */
    public Builder threads(int n) {
      if (n < 0 || n > 64) throw new IllegalArgumentException("threads = " + n + ": must be in [0, 64] (0 = automatic)");
      this.threads = n;
      return this;
    }

    /** How the CUDA deepep backend moves rows (default: the engine's, AUTO unless DEEPEP4J_CUDA_TRANSFER says). */
    public Builder cudaTransfer(CudaTransfer t) {
      this.cudaTransfer = Objects.requireNonNull(t, "cudaTransfer = null: must be AUTO, SM or COPY_ENGINE");
      return this;
    }

    /** Copy-engine copies per peer and step, in [1, 16] (default 4); every rank must use the same value. */
    public Builder ceChunks(int n) {
      if (n < 1 || n > 16) throw new IllegalArgumentException("ceChunks = " + n + ": must be in [1, 16]");
      this.ceChunks = n;
      return this;
    }

    /**
     * Print, after each copy-engine step and each SM ring step of a call that waits, where its time went (stderr;
     * default off).
     */
    public Builder cudaTrace(boolean on) {
      this.cudaTrace = on;
      return this;
    }

    /** CPU ranks of one process copy rows directly (default on); off sends every row through the rings. */
    public Builder cpuDirect(boolean on) {
      this.cpuDirect = on;
      return this;
    }

    /**
     * Stream-ordered steps (C {@code stream_ordered}; default: the engine's, off unless DEEPEP4J_STREAM_ORDERED=1):
     * dispatch and combine on {@link EpDeviceArray}s return once their step is queued on the rank's stream, and a
     * step's failure found on the GPU surfaces at the next call, {@link EpBuffer#sync()}, or the next copy to the
     * host. Calls on host INDArrays still return with their outputs complete. Only for the CUDA device with the
     * DEEPEP dispatcher and SM or AUTO transfer (checked at {@link #build()}); every rank must use the same value.
     */
    public Builder streamOrdered(boolean on) {
      this.streamOrdered = on;
      return this;
    }

    /**
     * Threads each rank uses to copy host arrays to and from pinned staging (CUDA buffers: EpBuffer calls on host
     * INDArrays, {@link EpDeviceArray} copies, the MoE block's activations), in [0, 64]; 0 (default) = automatic:
     * the machine's cores divided by the group's ranks, at most 8. One thread copies ~6 GB/s, the host link ~50.
     */
    public Builder hostCopyThreads(int n) {
      if (n < 0 || n > 64)
        throw new IllegalArgumentException("hostCopyThreads = " + n + ": must be in [0, 64] (0 = automatic)");
      this.hostCopyThreads = n;
      return this;
    }

    public EpConfig build() {
      if (ringTokens < maxSendTokensPerChunk)
        throw new IllegalArgumentException("ringTokens = " + ringTokens + ": must be >= maxSendTokensPerChunk = " + maxSendTokensPerChunk);
      if (Boolean.TRUE.equals(streamOrdered)) {
        // where the engine would refuse it, or accept it and change nothing (the CPU backend completes every call)
        if (device != EpDevice.CUDA)
          throw new IllegalArgumentException("streamOrdered = true with device = " + device
              + ": stream-ordered steps are a CUDA feature (the CPU device completes every call on return); use device(EpDevice.CUDA)");
        if (dispatch != EpDispatch.DEEPEP)
          throw new IllegalArgumentException("streamOrdered = true with dispatch = " + dispatch
              + ": stream-ordered steps need the DEEPEP dispatcher (its SM ring kernels), not NCCL all-to-all");
        if (cudaTransfer == CudaTransfer.COPY_ENGINE)
          throw new IllegalArgumentException("streamOrdered = true with cudaTransfer = COPY_ENGINE: stream-ordered steps"
              + " use the SM ring kernels (set cudaTransfer to SM or AUTO)");
      }
      return new EpConfig(this);
    }
  }
}

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

  private EpConfig(Builder b) {
    dispatch = b.dispatch;
    bufferSizeGb = b.bufferSizeGb;
    numSms = b.numSms;
    timeout = b.timeout;
    maxSendTokensPerChunk = b.maxSendTokensPerChunk;
    ringTokens = b.ringTokens;
    threads = b.threads;
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

  /**
   * Smallest buffer (in GB) that carries one chunk per ring for rows of {@code hidden} elements of {@code dtype} on
   * {@code numRanks} ranks with this config's SMs, chunk and ring sizes.
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
        .num_threads(threads);
    return c;
  }

  @Override
  public String toString() {
    return "EpConfig{dispatch=" + dispatch + ", bufferSizeGb=" + bufferSizeGb + ", numSms=" + numSms
        + ", timeout=" + timeout + ", maxSendTokensPerChunk="
        + maxSendTokensPerChunk + ", ringTokens=" + ringTokens + ", threads=" + threads + "}";
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

    private Builder() {}

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

    public EpConfig build() {
      if (ringTokens < maxSendTokensPerChunk)
        throw new IllegalArgumentException("ringTokens = " + ringTokens + ": must be >= maxSendTokensPerChunk = " + maxSendTokensPerChunk);
      return new EpConfig(this);
    }
  }
}

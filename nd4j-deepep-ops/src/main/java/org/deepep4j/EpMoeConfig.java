package org.deepep4j;

import org.deepep4j.natives.DeepEp4jNative;
import org.nd4j.linalg.api.buffer.DataType;

/**
 * Immutable settings of an {@link EpMoeBlock}: the shape of the MoE block (hidden, ffn, experts, top-k), its
 * precision and routing rules. Every setter checks its value; an invalid one is an {@link IllegalArgumentException}
 * naming the setting, the value and the rule.
 *
 * <pre>{@code
 * EpMoeConfig c = EpMoeConfig.builder().hidden(64).ffn(128).numExperts(8).topK(2).maxTokens(1024).build();
 * }</pre>
 */
public final class EpMoeConfig {
  /** How the experts' GEMMs are issued on CUDA (the CPU backend runs one GEMM per expert whatever this says). */
  public enum Gemm { AUTO, GROUPED, LOOP }

  /** Router scores: softmax over the experts of a token, or an independent sigmoid per expert. */
  public enum Score { SOFTMAX, SIGMOID }

  private final long hidden;
  private final long ffn;
  private final int numExperts;
  private final int topK;
  private final DataType dataType;
  private final Score score;
  private final boolean normalizeTopK;
  private final Gemm gemm;
  private final double auxLossCoefficient;
  private final long maxTokens;

  private EpMoeConfig(Builder b) {
    hidden = b.hidden;
    ffn = b.ffn;
    numExperts = b.numExperts;
    topK = b.topK;
    dataType = b.dataType;
    score = b.score;
    normalizeTopK = b.normalizeTopK;
    gemm = b.gemm;
    auxLossCoefficient = b.auxLossCoefficient;
    maxTokens = b.maxTokens;
  }

  public static Builder builder() { return new Builder(); }

  public long hidden() { return hidden; }
  public long ffn() { return ffn; }
  public int numExperts() { return numExperts; }
  public int topK() { return topK; }
  public DataType dataType() { return dataType; }
  public Score score() { return score; }
  public boolean normalizeTopK() { return normalizeTopK; }
  public Gemm gemm() { return gemm; }
  public double auxLossCoefficient() { return auxLossCoefficient; }
  public long maxTokens() { return maxTokens; }

  /** Elements of one expert tensor (params, grads or a moment) of a rank holding {@code numExperts / ranks} experts. */
  public long tensorLength(int ranks) { return (long) (numExperts / ranks) * 3 * hidden * ffn; }

  static int nativeDtype(DataType t) {
    switch (t) {
      case FLOAT: return DeepEp4jNative.DEEPEP4J_FLOAT32;
      case BFLOAT16: return DeepEp4jNative.DEEPEP4J_BFLOAT16;
      case DOUBLE: return DeepEp4jNative.DEEPEP4J_FLOAT64;
      default: throw new IllegalArgumentException("dataType = " + t + ": must be FLOAT, BFLOAT16 or DOUBLE");
    }
  }

  DeepEp4jNative.MoeConfig toNative() {
    DeepEp4jNative.MoeConfig c = new DeepEp4jNative.MoeConfig();
    DeepEp4jNative.deepep4j_moe_config_init(c);
    c.hidden(hidden).ffn(ffn).num_experts(numExperts).num_topk(topK).dtype(nativeDtype(dataType))
        .score_function(score == Score.SOFTMAX ? DeepEp4jNative.DEEPEP4J_SCORE_SOFTMAX : DeepEp4jNative.DEEPEP4J_SCORE_SIGMOID)
        .normalize_topk(normalizeTopK ? 1 : 0).gemm(gemm.ordinal()).aux_loss_coef(auxLossCoefficient)
        .max_tokens(maxTokens);
    return c;
  }

  @Override
  public String toString() {
    return "EpMoeConfig{hidden=" + hidden + ", ffn=" + ffn + ", numExperts=" + numExperts + ", topK=" + topK
        + ", dataType=" + dataType + ", score=" + score + ", normalizeTopK=" + normalizeTopK + ", gemm=" + gemm
        + ", auxLossCoefficient=" + auxLossCoefficient + ", maxTokens=" + maxTokens + "}";
  }

  /** Builder with validation at each setter; {@link #build()} checks the settings against each other. */
  public static final class Builder {
    private long hidden;
    private long ffn;
    private int numExperts;
    private int topK;
    private DataType dataType = DataType.FLOAT;
    private Score score = Score.SOFTMAX;
    private boolean normalizeTopK = true;
    private Gemm gemm = Gemm.AUTO;
    private double auxLossCoefficient;
    private long maxTokens = 4096;

    private Builder() {}

    /** Token width H (required): >= 1; the buffer's rule (H * element size a multiple of 16 bytes) is checked at create. */
    public Builder hidden(long h) {
      if (h < 1) throw new IllegalArgumentException("hidden = " + h + ": must be >= 1");
      hidden = h;
      return this;
    }

    /** Inner width F of each SwiGLU expert (required): >= 1. */
    public Builder ffn(long f) {
      if (f < 1) throw new IllegalArgumentException("ffn = " + f + ": must be >= 1");
      ffn = f;
      return this;
    }

    /** Experts E over all ranks (required): >= 1, divisible by the buffer's ranks (checked at create). */
    public Builder numExperts(int e) {
      if (e < 1) throw new IllegalArgumentException("numExperts = " + e + ": must be >= 1");
      numExperts = e;
      return this;
    }

    /** Experts per token K (required): in [1, 32], at most numExperts (checked at build). */
    public Builder topK(int k) {
      if (k < 1 || k > DeepEp4jNative.DEEPEP4J_MAX_TOPK)
        throw new IllegalArgumentException("topK = " + k + ": must be in [1, " + DeepEp4jNative.DEEPEP4J_MAX_TOPK + "]");
      topK = k;
      return this;
    }

    /** Activations and expert weights (default FLOAT): FLOAT, BFLOAT16 (fp32 accumulate) or DOUBLE. */
    public Builder dataType(DataType t) {
      if (t != DataType.FLOAT && t != DataType.BFLOAT16 && t != DataType.DOUBLE)
        throw new IllegalArgumentException("dataType = " + t + ": must be FLOAT, BFLOAT16 or DOUBLE");
      dataType = t;
      return this;
    }

    public Builder score(Score s) {
      if (s == null) throw new IllegalArgumentException("score = null: must be SOFTMAX or SIGMOID");
      score = s;
      return this;
    }

    /** Divide the K chosen scores by their sum (default true). */
    public Builder normalizeTopK(boolean b) {
      normalizeTopK = b;
      return this;
    }

    public Builder gemm(Gemm g) {
      if (g == null) throw new IllegalArgumentException("gemm = null: must be AUTO, GROUPED or LOOP");
      gemm = g;
      return this;
    }

    /** Load-balancing loss coefficient (default 0 = none): finite, >= 0. */
    public Builder auxLossCoefficient(double c) {
      if (!(c >= 0) || !Double.isFinite(c))
        throw new IllegalArgumentException("auxLossCoefficient = " + c + ": must be finite and >= 0");
      auxLossCoefficient = c;
      return this;
    }

    /** Largest number of tokens of one forward (default 4096): >= 1; workspaces are sized for it. */
    public Builder maxTokens(long n) {
      if (n < 1) throw new IllegalArgumentException("maxTokens = " + n + ": must be >= 1");
      maxTokens = n;
      return this;
    }

    public EpMoeConfig build() {
      if (hidden < 1) throw new IllegalArgumentException("hidden = " + hidden + ": must be set (>= 1)");
      if (ffn < 1) throw new IllegalArgumentException("ffn = " + ffn + ": must be set (>= 1)");
      if (numExperts < 1) throw new IllegalArgumentException("numExperts = " + numExperts + ": must be set (>= 1)");
      if (topK < 1) throw new IllegalArgumentException("topK = " + topK + ": must be set (>= 1)");
      if (topK > numExperts)
        throw new IllegalArgumentException("topK = " + topK + ": must be <= numExperts = " + numExperts);
      return new EpMoeConfig(this);
    }
  }
}

package org.deepep4j;

import org.deepep4j.natives.DeepEp4jNative;

/**
 * One optimizer step of an {@link EpMoeBlock}'s experts, with DL4J's update rules: SGD, Adam, or Adam with decoupled
 * weight decay (AdamW). The learning rate is the one for this step (schedules are evaluated by the caller).
 */
public final class EpOptimizer {
  public enum Kind { SGD, ADAM, ADAMW }

  private final Kind kind;
  private final double learningRate;
  private final double beta1;
  private final double beta2;
  private final double epsilon;
  private final double weightDecay;
  private final long iteration;
  private final double gradScale;

  private EpOptimizer(Builder b) {
    kind = b.kind;
    learningRate = b.learningRate;
    beta1 = b.beta1;
    beta2 = b.beta2;
    epsilon = b.epsilon;
    weightDecay = b.weightDecay;
    iteration = b.iteration;
    gradScale = b.gradScale;
  }

  /** A builder with DL4J's defaults for {@code kind} (Adam: lr 1e-3, beta1 0.9, beta2 0.999, epsilon 1e-8). */
  public static Builder builder(Kind kind) { return new Builder(kind); }

  public Kind kind() { return kind; }
  public double learningRate() { return learningRate; }
  public double beta1() { return beta1; }
  public double beta2() { return beta2; }
  public double epsilon() { return epsilon; }
  public double weightDecay() { return weightDecay; }
  public long iteration() { return iteration; }
  public double gradScale() { return gradScale; }

  void fill(DeepEp4jNative.Optimizer o) {
    DeepEp4jNative.deepep4j_optimizer_init(o, kind.ordinal());
    o.learning_rate(learningRate).beta1(beta1).beta2(beta2).epsilon(epsilon).weight_decay(weightDecay)
        .iteration(iteration).grad_scale(gradScale);
  }

  @Override
  public String toString() {
    return "EpOptimizer{" + kind + ", lr=" + learningRate + ", beta1=" + beta1 + ", beta2=" + beta2 + ", epsilon="
        + epsilon + ", weightDecay=" + weightDecay + ", iteration=" + iteration + ", gradScale=" + gradScale + "}";
  }

  public static final class Builder {
    private final Kind kind;
    private double learningRate = 1e-3;
    private double beta1 = 0.9;
    private double beta2 = 0.999;
    private double epsilon = 1e-8;
    private double weightDecay;
    private long iteration;
    private double gradScale = 1.0;

    private Builder(Kind kind) {
      if (kind == null) throw new IllegalArgumentException("kind = null: must be SGD, ADAM or ADAMW");
      this.kind = kind;
    }

    public Builder learningRate(double lr) {
      if (!(lr >= 0) || !Double.isFinite(lr)) throw new IllegalArgumentException("learningRate = " + lr + ": must be finite and >= 0");
      learningRate = lr;
      return this;
    }

    public Builder beta1(double b) {
      if (!(b >= 0 && b < 1)) throw new IllegalArgumentException("beta1 = " + b + ": must be in [0, 1)");
      beta1 = b;
      return this;
    }

    public Builder beta2(double b) {
      if (!(b >= 0 && b < 1)) throw new IllegalArgumentException("beta2 = " + b + ": must be in [0, 1)");
      beta2 = b;
      return this;
    }

    public Builder epsilon(double e) {
      if (!(e > 0) || !Double.isFinite(e)) throw new IllegalArgumentException("epsilon = " + e + ": must be finite and > 0");
      epsilon = e;
      return this;
    }

    /** Decoupled weight decay (ADAMW only): finite, >= 0. */
    public Builder weightDecay(double w) {
      if (!(w >= 0) || !Double.isFinite(w)) throw new IllegalArgumentException("weightDecay = " + w + ": must be finite and >= 0");
      if (w != 0 && kind != Kind.ADAMW) throw new IllegalArgumentException("weightDecay = " + w + ": only ADAMW decays weights (kind = " + kind + ")");
      weightDecay = w;
      return this;
    }

    /** 0-based step count, for Adam's bias correction: >= 0. */
    public Builder iteration(long i) {
      if (i < 0) throw new IllegalArgumentException("iteration = " + i + ": must be >= 0");
      iteration = i;
      return this;
    }

    /** Factor applied to the accumulated gradients first (DL4J: 1 / minibatch size): finite, > 0. */
    public Builder gradScale(double s) {
      if (!(s > 0) || !Double.isFinite(s)) throw new IllegalArgumentException("gradScale = " + s + ": must be finite and > 0");
      gradScale = s;
      return this;
    }

    public EpOptimizer build() { return new EpOptimizer(this); }
  }
}

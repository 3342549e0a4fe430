package org.deepep4j;

/** Where a rank's tokens go: counts per rank and per expert, and which ranks each token visits. */
public final class EpLayout {
  private final int[] tokensPerRank;
  private final int[] tokensPerExpert;
  private final boolean[][] tokenInRank;

  EpLayout(int[] tokensPerRank, int[] tokensPerExpert, boolean[][] tokenInRank) {
    this.tokensPerRank = tokensPerRank;
    this.tokensPerExpert = tokensPerExpert;
    this.tokenInRank = tokenInRank;
  }

  /** Tokens sent to each rank (a token counts once per rank). */
  public int[] tokensPerRank() { return tokensPerRank.clone(); }
  /** (token, k) entries per global expert. */
  public int[] tokensPerExpert() { return tokensPerExpert.clone(); }
  /** [N][R]: whether token n visits rank r. */
  public boolean isTokenInRank(int token, int rank) { return tokenInRank[token][rank]; }
}

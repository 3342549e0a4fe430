package org.deepep4j;

import java.util.ArrayList;
import java.util.List;

/** Plain-Java reference of dispatch/combine semantics (fp64 sums), independent of the engine. */
final class Reference {
  private Reference() {}

  /** For destination rank d: the (source rank, token) pairs it receives, grouped by source then token order. */
  static List<int[]> received(long[][] topk, int k, int numExperts, int ranks, int d) {
    int perRank = numExperts / ranks;
    List<int[]> rows = new ArrayList<>();
    for (int s = 0; s < ranks; ++s) {
      int n = topk[s].length / k;
      for (int t = 0; t < n; ++t) {
        boolean hit = false;
        for (int j = 0; j < k; ++j) {
          long e = topk[s][t * k + j];
          if (e >= 0 && e / perRank == d) hit = true;
        }
        if (hit) rows.add(new int[] {s, t});
      }
    }
    return rows;
  }

  /** Number of distinct ranks token t of a rank visits. */
  static int ranksVisited(long[] topk, int k, int t, int numExperts, int ranks) {
    int perRank = numExperts / ranks;
    boolean[] seen = new boolean[ranks];
    int c = 0;
    for (int j = 0; j < k; ++j) {
      long e = topk[t * k + j];
      if (e >= 0 && !seen[(int) (e / perRank)]) {
        seen[(int) (e / perRank)] = true;
        ++c;
      }
    }
    return c;
  }
}

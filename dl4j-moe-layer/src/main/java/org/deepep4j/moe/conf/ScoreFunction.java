package org.deepep4j.moe.conf;

/** How router logits become expert scores. */
public enum ScoreFunction {
    /** Scores over all experts sum to one (Mixtral, DeepSeek-V2 style). */
    SOFTMAX,
    /** Independent per-expert scores in (0,1) (DeepSeek-V3 style, usually with top-k renormalisation). */
    SIGMOID
}

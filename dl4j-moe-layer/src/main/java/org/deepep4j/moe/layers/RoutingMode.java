package org.deepep4j.moe.layers;

/** Whether a MoE layer routes afresh, records its routing, or replays a recorded one. */
public enum RoutingMode {
    /** Top-k of the current scores. */
    NORMAL,
    /** Top-k of the current scores, kept for a later replay. */
    RECORD,
    /** The recorded expert choices; weights still come from the current scores, so gradients flow. */
    REPLAY
}

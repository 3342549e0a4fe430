package org.deepep4j;

/**
 * What a dispatch of device arrays delivers, in device memory of the buffer: received rows {@code recvX} [M, H], local
 * expert ids {@code recvTopkIdx} [M, K] (LONG, -1 = elsewhere), {@code recvTopkWeights} [M, K] (FLOAT, null when no
 * weights were sent), and the handle for combine and backward. The caller closes the arrays (or their buffer).
 */
public record EpDeviceDispatchResult(EpDeviceArray recvX, EpDeviceArray recvTopkIdx, EpDeviceArray recvTopkWeights,
                                     EpHandle handle) {}

package org.deepep4j;

import org.deepep4j.natives.DeepEp4jNative;

/** Turns a native status into the matching Java exception, with the engine's message (argument, value, rule). */
final class Status {
  private Status() {}

  static void check(int status) {
    if (status == DeepEp4jNative.DEEPEP4J_OK) return;
    String message = DeepEp4jNative.deepep4j_last_error().getString();
    String name = DeepEp4jNative.deepep4j_status_name(status).getString();
    if (status == DeepEp4jNative.DEEPEP4J_ERR_INVALID_ARGUMENT) throw new IllegalArgumentException(message);
    if (status == DeepEp4jNative.DEEPEP4J_ERR_TIMEOUT) throw new EpTimeoutException(name + ": " + message);
    if (status == DeepEp4jNative.DEEPEP4J_ERR_PEER_ERROR) throw new EpPeerException(name + ": " + message);
    throw new IllegalStateException(name + ": " + message);
  }
}

package org.deepep4j;

/**
 * A collective step stopped because another rank joined it with its own failure (DEEPEP4J_ERR_PEER_ERROR); the
 * message names that rank and its reason. The root cause is on that rank.
 */
public class EpPeerException extends IllegalStateException {
  public EpPeerException(String message) {
    super(message);
  }
}

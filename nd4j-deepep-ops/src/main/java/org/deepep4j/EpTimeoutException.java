package org.deepep4j;

/** A collective step gave up waiting for a peer (it never arrived or died); thrown on every rank that can report. */
public class EpTimeoutException extends IllegalStateException {
  public EpTimeoutException(String message) {
    super(message);
  }
}

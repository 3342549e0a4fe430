package org.deepep4j;

import java.time.Duration;

/** How the ranks of a group share small byte blobs (the native engine's peer-memory handles, and similar). */
interface BlobExchange extends AutoCloseable {
  /** Collective: every rank gives its blob and receives all of them, in rank order. */
  byte[][] allGather(int rank, byte[] mine, Duration timeout);

  @Override
  void close();
}

package org.deepep4j.moe.train;

/** A rank stopped waiting for its peers because another rank failed first; the root cause is on that rank. */
final class RankAbortedException extends IllegalStateException {
    RankAbortedException(String message) {
        super(message);
    }
}

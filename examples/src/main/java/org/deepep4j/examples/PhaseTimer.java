package org.deepep4j.examples;

import java.util.LinkedHashMap;
import java.util.Map;

/** Wall time per named phase of a training step, summed over steps; one per rank thread. */
public final class PhaseTimer {
    private final Map<String, Long> nanos = new LinkedHashMap<>();
    private String current;
    private long since;

    /** Ends the running phase (if any) and starts {@code phase}. */
    public void start(String phase) {
        stop();
        current = phase;
        since = System.nanoTime();
    }

    public void stop() {
        if (current != null) nanos.merge(current, System.nanoTime() - since, Long::sum);
        current = null;
    }

    /** Phase name to total nanoseconds, in the order phases first ran. */
    public Map<String, Long> totals() {
        return nanos;
    }
}

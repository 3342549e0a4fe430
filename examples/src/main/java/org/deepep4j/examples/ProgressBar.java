package org.deepep4j.examples;

import java.io.PrintStream;
import java.util.Locale;

/** One-line progress bar with rate and ETA, redrawn in place with a carriage return. */
public final class ProgressBar {
    private static final int WIDTH = 30;
    private final PrintStream out;
    private final int total;
    private final long startNanos = System.nanoTime();

    public ProgressBar(PrintStream out, int total) {
        this.out = out;
        this.total = total;
    }

    public void update(int done, String suffix) {
        out.print("\r" + render(done, System.nanoTime() - startNanos, suffix));
        if (done >= total) out.println();
        out.flush();
    }

    /** The text of the bar after {@code done} of the steps in {@code elapsedNanos}. */
    public String render(int done, long elapsedNanos, String suffix) {
        int filled = (int) ((long) WIDTH * done / total);
        double seconds = elapsedNanos / 1e9;
        String eta = done == 0 ? "--:--" : clock(seconds * (total - done) / done);
        return String.format(Locale.ROOT, "[%s%s] %d/%d steps  %s elapsed  ETA %s  %s", "#".repeat(filled),
                ".".repeat(WIDTH - filled), done, total, clock(seconds), eta, suffix);
    }

    static String clock(double seconds) {
        long s = Math.round(seconds);
        return String.format(Locale.ROOT, "%02d:%02d", s / 60, s % 60);
    }
}

package org.deepep4j.examples;

import java.io.PrintStream;
import java.util.Locale;

/**
 * Progress with rate and ETA. On a terminal: one line redrawn in place with a carriage return. Elsewhere (a log file,
 * a pipe, CI): a plain line at every tenth of the run, so the log reads line by line.
 */
public final class ProgressBar {
    private static final int WIDTH = 30;
    private static final int PLAIN_LINES = 10;
    private final PrintStream out;
    private final int total;
    private final boolean redraw;
    private final long startNanos = System.nanoTime();
    private int nextPlainLine = 1;

    /** Redraws in place only when {@code out} is this process's stdout and stdout is a terminal. */
    public ProgressBar(PrintStream out, int total) {
        this(out, total, out == System.out && System.console() != null);
    }

    /** @param redraw true: one line redrawn with carriage returns; false: periodic plain lines */
    public ProgressBar(PrintStream out, int total, boolean redraw) {
        this.out = out;
        this.total = total;
        this.redraw = redraw;
    }

    /** Whether the bar is redrawn in place (a terminal) rather than printed as plain lines. */
    public boolean redraws() {
        return redraw;
    }

    public void update(int done, String suffix) {
        if (redraw) {
            out.print("\r" + render(done, System.nanoTime() - startNanos, suffix));
            if (done >= total) out.println();
        } else if (done >= total || (long) done * PLAIN_LINES >= (long) nextPlainLine * total) {
            out.println(render(done, System.nanoTime() - startNanos, suffix));
            while ((long) nextPlainLine * total <= (long) done * PLAIN_LINES) nextPlainLine++;
        }
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

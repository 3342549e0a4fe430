package org.deepep4j.examples;

import java.util.Locale;
import java.util.Map;

/** Plain-text tables of a training result: per-expert load and per-phase timing. */
public final class Report {
    private Report() {}

    /** One line per expert: owning rank, tokens received, share of all, and the task it served most. */
    public static String expertLoad(TrainingResult r, int ranks) {
        int experts = r.receivedPerExpert().length;
        long total = 0;
        for (long c : r.receivedPerExpert()) total += c;
        StringBuilder sb = new StringBuilder("expert  rank  tokens received   share  main task (share of its tokens)\n");
        for (int e = 0; e < experts; e++) {
            int bestTask = 0;
            long expertTotal = 0;
            for (int t = 0; t < r.taskExpert().length; t++) {
                expertTotal += r.taskExpert()[t][e];
                if (r.taskExpert()[t][e] > r.taskExpert()[bestTask][e]) bestTask = t;
            }
            double taskShare = expertTotal == 0 ? 0 : 100.0 * r.taskExpert()[bestTask][e] / expertTotal;
            sb.append(String.format(Locale.ROOT, "%6d  %4d  %15d  %5.1f%%  task %d (%.0f%%)%n", e, e / (experts / ranks),
                    r.receivedPerExpert()[e], total == 0 ? 0 : 100.0 * r.receivedPerExpert()[e] / total, bestTask, taskShare));
        }
        return sb.toString();
    }

    /** One line per phase: total and per-step milliseconds of the slowest rank, and the share of the step. */
    public static String phases(TrainingResult r, int steps) {
        long total = 0;
        for (long ns : r.phaseNanos().values()) total += ns;
        StringBuilder sb = new StringBuilder("phase                 total ms   ms/step   share\n");
        for (Map.Entry<String, Long> p : r.phaseNanos().entrySet()) {
            sb.append(String.format(Locale.ROOT, "%-20s %9.1f %9.3f  %5.1f%%%n", p.getKey(), p.getValue() / 1e6,
                    p.getValue() / 1e6 / steps, total == 0 ? 0 : 100.0 * p.getValue() / total));
        }
        sb.append(String.format(Locale.ROOT, "%-20s %9.1f %9.3f%n", "all", total / 1e6, total / 1e6 / steps));
        return sb.toString();
    }
}

package org.deepep4j.examples;

import java.io.PrintStream;
import java.nio.file.Path;
import java.util.List;
import java.util.Locale;

/** The main job: train a small MoE model expert-parallel over in-process CPU ranks and report what happened. */
public final class Main {
    private Main() {}

    public static void main(String[] args) {
        System.exit(run(args, System.out, System.err));
    }

    /** Draws the run's charts into {@code dir}; returns the files written. */
    @FunctionalInterface
    interface ChartWriter {
        List<Path> write(TrainingResult r, Path dir) throws Exception;
    }

    static final ChartWriter PNG_CHARTS = (r, dir) -> List.of(Charts.png(Charts.lossCurve(r), dir, "loss"),
            Charts.png(Charts.expertLoad(r), dir, "expert-load"));

    /** Runs the CLI; returns the exit code: 0 done, 1 training failed, 2 bad flags. */
    public static int run(String[] args, PrintStream out, PrintStream err) {
        return run(args, out, err, PNG_CHARTS);
    }

    static int run(String[] args, PrintStream out, PrintStream err, ChartWriter charts) {
        Options o;
        try {
            o = Options.parse(args);
        } catch (UsageException e) {
            err.println("error: " + e.getMessage());
            err.println("Run with --help for the list of flags.");
            return 2;
        }
        if (o.help) {
            out.println(Options.USAGE);
            return 0;
        }
        // Headless: the charts render to PNG files, never to a window.
        System.setProperty("java.awt.headless", "true");
        out.printf(Locale.ROOT, "deepep4j MoE example: %d ranks (CPU threads), %d experts (%d per rank), top-%d, dispatch %s,"
                        + " %d epochs x %d steps x %d tokens per rank, %d tasks%n", o.ranks, o.experts, o.expertsPerRank(),
                o.topK, o.dispatch, o.epochs, o.stepsPerEpoch, o.tokensPerRank, o.tasks);
        TrainingResult r;
        try {
            r = Trainer.train(o, out);
            out.printf(Locale.ROOT, "%ntrained in %.1f s; loss %.5f -> %.5f (first -> last epoch)%n%n", r.seconds(),
                    r.epochLoss()[0], r.epochLoss()[r.epochLoss().length - 1]);
            out.println("Per-expert load (tokens each expert received through dispatch):");
            out.println(Report.expertLoad(r, o.ranks));
            out.println("Per-phase time (slowest rank):");
            out.println(Report.phases(r, o.totalSteps()));
        } catch (Exception e) {
            err.println("\ntraining failed: " + e);
            for (Throwable c = e.getCause(); c != null; c = c.getCause()) err.println("  caused by: " + c);
            return 1;
        }
        // The training is done and reported; charts are a bonus that a server without fonts cannot draw (Java's font
        // system then throws Errors, not Exceptions), so no failure here changes the exit code.
        try {
            for (Path p : charts.write(r, o.outDir)) out.println("wrote " + p.toAbsolutePath());
        } catch (Exception | LinkageError | InternalError e) {
            out.println("charts not drawn: " + e + ". The report above is complete. Drawing needs fonts: install"
                    + " fontconfig and a font (Debian/Ubuntu: apt-get install fontconfig fonts-dejavu-core), or run"
                    + " examples/notebooks/moe-training.ipynb on a machine that has them.");
        }
        return 0;
    }
}

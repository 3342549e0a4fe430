package org.deepep4j.examples;

import java.nio.file.Path;
import java.util.Locale;

/** Settings of one training run, parsed from command-line flags. Defaults: 600 steps, about a minute on 2 CPU cores. */
public final class Options {
    public int ranks = 2;
    public int experts = 8;
    public int topK = 2;
    public String dispatch = "deepep";
    public int epochs = 10;
    public int stepsPerEpoch = 60;
    public int tokensPerRank = 512;
    public int hidden = 64;
    public int expertHidden = 128;
    public int tasks = 8;
    public double learningRate = 0.01;
    public long seed = 42;
    public Path outDir = Path.of("examples", "out");
    public boolean help;

    public static final String USAGE = String.join("\n",
            "Usage: java -jar examples/target/deepep4j-examples.jar [flags]",
            "",
            "Trains a small Mixture-of-Experts regression model on a synthetic multi-task data set, expert-parallel over",
            "in-process ranks on the CPU: tokens move to the rank that owns their experts with deepep4j's dispatch and come",
            "back with its combine. Each task has its own target function, so experts visibly specialise by task.",
            "",
            "Flags (default in brackets):",
            "  --ranks N          expert-parallel ranks, threads of this JVM [2]",
            "  --experts E        experts in total, a multiple of --ranks [8]",
            "  --top-k K          experts per token, 1..E [2]",
            "  --dispatch B       dispatch backend: deepep | alltoall (alltoall needs CUDA GPUs) [deepep]",
            "  --epochs N         epochs [10]",
            "  --steps N          steps per epoch [60]",
            "  --tokens N         tokens per rank per step [512]",
            "  --hidden H         token width, a multiple of 4 in 4..8192 (rows move as 16-byte vectors of fp32) [64]",
            "  --expert-hidden F  width of each expert's inner layer [128]",
            "  --tasks T          tasks in the data set, 1..64 [8]",
            "  --lr X             Adam learning rate, > 0 [0.01]",
            "  --seed S           seed of data and initial weights [42]",
            "  --out DIR          where the PNG charts go [examples/out]",
            "  --help             print this text");

    /** Parses flags; throws {@link UsageException} naming the flag, the value and the rule when one is wrong. */
    public static Options parse(String... args) throws UsageException {
        Options o = new Options();
        for (int i = 0; i < args.length; i++) {
            String flag = args[i];
            if (flag.equals("--help") || flag.equals("-h")) {
                o.help = true;
                continue;
            }
            String value;
            int eq = flag.indexOf('=');
            if (flag.startsWith("--") && eq > 0) {
                value = flag.substring(eq + 1);
                flag = flag.substring(0, eq);
            } else {
                if (i + 1 >= args.length) {
                    if (isKnown(flag)) throw new UsageException(flag + " needs a value");
                    throw new UsageException("unknown flag '" + flag + "'");
                }
                value = args[++i];
            }
            switch (flag) {
                case "--ranks": o.ranks = intIn(flag, value, 1, 64); break;
                case "--experts": o.experts = intIn(flag, value, 1, 1024); break;
                case "--top-k": o.topK = intIn(flag, value, 1, 1024); break;
                case "--dispatch": o.dispatch = backend(value); break;
                case "--epochs": o.epochs = intIn(flag, value, 1, 10_000); break;
                case "--steps": o.stepsPerEpoch = intIn(flag, value, 1, 1_000_000); break;
                case "--tokens": o.tokensPerRank = intIn(flag, value, 1, 1 << 20); break;
                case "--hidden": o.hidden = intIn(flag, value, 4, 8192); break;
                case "--expert-hidden": o.expertHidden = intIn(flag, value, 1, 8192); break;
                case "--tasks": o.tasks = intIn(flag, value, 1, 64); break;
                case "--lr": o.learningRate = positive(flag, value); break;
                case "--seed": o.seed = longValue(flag, value); break;
                case "--out": o.outDir = Path.of(value); break;
                default: throw new UsageException("unknown flag '" + flag + "'");
            }
        }
        if (o.experts % o.ranks != 0) {
            throw new UsageException("--experts " + o.experts + " must be a multiple of --ranks " + o.ranks);
        }
        if (o.hidden % 4 != 0) {
            throw new UsageException("--hidden " + o.hidden + " must be a multiple of 4 (rows move as 16-byte vectors"
                    + " of fp32)");
        }
        if (o.topK > o.experts) {
            throw new UsageException("--top-k " + o.topK + " must be at most --experts " + o.experts);
        }
        return o;
    }

    private static boolean isKnown(String flag) {
        return USAGE.contains("  " + flag + " ");
    }

    private static String backend(String value) throws UsageException {
        String v = value.toLowerCase(Locale.ROOT);
        if (!v.equals("deepep") && !v.equals("alltoall")) {
            throw new UsageException("--dispatch '" + value + "' must be deepep or alltoall");
        }
        return v;
    }

    private static int intIn(String flag, String value, int min, int max) throws UsageException {
        int v;
        try {
            v = Integer.parseInt(value);
        } catch (NumberFormatException e) {
            throw new UsageException(flag + " '" + value + "' must be a whole number");
        }
        if (v < min || v > max) {
            throw new UsageException(flag + " " + v + " must be in " + min + ".." + max);
        }
        return v;
    }

    private static double positive(String flag, String value) throws UsageException {
        double v;
        try {
            v = Double.parseDouble(value);
        } catch (NumberFormatException e) {
            throw new UsageException(flag + " '" + value + "' must be a number");
        }
        if (!(v > 0) || Double.isInfinite(v)) {
            throw new UsageException(flag + " " + value + " must be a finite number > 0");
        }
        return v;
    }

    private static long longValue(String flag, String value) throws UsageException {
        try {
            return Long.parseLong(value);
        } catch (NumberFormatException e) {
            throw new UsageException(flag + " '" + value + "' must be a whole number");
        }
    }

    public int expertsPerRank() {
        return experts / ranks;
    }

    public int totalSteps() {
        return epochs * stepsPerEpoch;
    }
}

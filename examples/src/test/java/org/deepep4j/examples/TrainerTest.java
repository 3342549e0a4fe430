package org.deepep4j.examples;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.io.ByteArrayOutputStream;
import java.io.PrintStream;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.Arrays;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

/**
 * End to end over real in-process ranks: the MoELayer, trained by the ExpertParallelTrainer, moves every token through
 * deepep4j's dispatch and combine.
 */
class TrainerTest {
    @Test
    void lossFallsAndDispatchDeliversExactlyWhatTheRouterChose() throws Exception {
        Options o = Options.parse("--epochs", "3", "--steps", "6", "--tokens", "64", "--lr", "0.02");
        ByteArrayOutputStream log = new ByteArrayOutputStream();
        TrainingResult r = Trainer.train(o, new PrintStream(log, true, StandardCharsets.UTF_8));

        double first = r.epochLoss()[0];
        double last = r.epochLoss()[2];
        assertTrue(last < 0.9 * first, "loss per epoch " + Arrays.toString(r.epochLoss()));

        assertEquals((long) o.totalSteps() * o.ranks * o.tokensPerRank * o.topK, checkDeliveredEqualsChosen(o, r));

        String printed = log.toString(StandardCharsets.UTF_8);
        assertTrue(printed.contains("epoch 3/3  loss"), printed);
        assertTrue(printed.contains("18/18 steps"), printed);
        assertTrue(r.phaseNanos().keySet().containsAll(
                java.util.List.of("routing", "dispatch", "expert compute", "combine", "rest of step")),
                r.phaseNanos().toString());
        assertTrue(r.phaseNanos().get("expert compute") > 0, r.phaseNanos().toString());
    }

    @Test
    void fourRanksDeliverEveryAssignment() throws Exception {
        Options o = Options.parse("--ranks", "4", "--experts", "8", "--top-k", "3", "--epochs", "1", "--steps", "2",
                "--tokens", "40");
        TrainingResult r = Trainer.train(o, quiet());
        assertEquals(2 * 4 * 40 * 3, checkDeliveredEqualsChosen(o, r));
    }

    @Test
    void cliWritesBothPngsAndPrintsWhere(@TempDir Path dir) throws Exception {
        ByteArrayOutputStream out = new ByteArrayOutputStream();
        ByteArrayOutputStream err = new ByteArrayOutputStream();
        int code = Main.run(new String[] {"--epochs", "1", "--steps", "3", "--tokens", "32", "--out", dir.toString()},
                new PrintStream(out, true, StandardCharsets.UTF_8), new PrintStream(err, true, StandardCharsets.UTF_8));
        String printed = out.toString(StandardCharsets.UTF_8);
        assertEquals(0, code, printed + err.toString(StandardCharsets.UTF_8));
        for (String name : new String[] {"loss.png", "expert-load.png"}) {
            Path png = dir.resolve(name);
            byte[] head = Arrays.copyOf(Files.readAllBytes(png), 4);
            assertEquals("\u0089PNG", new String(head, StandardCharsets.ISO_8859_1), name);
            assertTrue(printed.contains("wrote " + png.toAbsolutePath()), printed);
        }
        assertTrue(printed.contains("Per-expert load"), printed);
        assertTrue(printed.contains("Per-phase time"), printed);
    }

    @Test
    void withoutFontsTheJobStillExitsZeroWithTheReportAndSaysWhyNoCharts(@TempDir Path dir) {
        // what a headless server without fontconfig throws from Java's font system: an Error, not an Exception
        Main.ChartWriter noFonts = (r, d) -> {
            throw new InternalError("Fontconfig head is null, check your fonts or fonts configuration");
        };
        ByteArrayOutputStream out = new ByteArrayOutputStream();
        ByteArrayOutputStream err = new ByteArrayOutputStream();
        int code = Main.run(new String[] {"--epochs", "1", "--steps", "2", "--tokens", "16", "--out", dir.toString()},
                new PrintStream(out, true, StandardCharsets.UTF_8), new PrintStream(err, true, StandardCharsets.UTF_8),
                noFonts);
        String printed = out.toString(StandardCharsets.UTF_8);
        assertEquals(0, code, printed + err.toString(StandardCharsets.UTF_8));
        assertTrue(printed.contains("Per-expert load") && printed.contains("Per-phase time"), printed);
        assertTrue(printed.contains("charts not drawn: java.lang.InternalError: Fontconfig head is null")
                && printed.contains("apt-get install fontconfig"), printed);
    }

    @Test
    void alltoallOnTheCpuFailsWithTheEnginesReason() {
        ByteArrayOutputStream out = new ByteArrayOutputStream();
        ByteArrayOutputStream err = new ByteArrayOutputStream();
        int code = Main.run(new String[] {"--dispatch", "alltoall", "--epochs", "1", "--steps", "1", "--tokens", "8"},
                new PrintStream(out, true, StandardCharsets.UTF_8), new PrintStream(err, true, StandardCharsets.UTF_8));
        String printed = err.toString(StandardCharsets.UTF_8);
        assertEquals(1, code, out.toString(StandardCharsets.UTF_8) + printed);
        assertTrue(printed.contains("training failed") && printed.contains("alltoall")
                && printed.contains("DEEPEP4J_DEVICE_CUDA"), printed);
    }

    /**
     * What the routers chose for each expert (the recorded routing, counted where the tokens live) equals what dispatch
     * delivered to it (counted where the expert lives).
     */
    private static long checkDeliveredEqualsChosen(Options o, TrainingResult r) {
        long assignments = 0;
        for (int e = 0; e < o.experts; e++) {
            long chosen = 0;
            for (int t = 0; t < o.tasks; t++) chosen += r.taskExpert()[t][e];
            assertEquals(chosen, r.receivedPerExpert()[e], "expert " + e);
            assignments += chosen;
        }
        return assignments;
    }

    private static PrintStream quiet() {
        return new PrintStream(new ByteArrayOutputStream(), true, StandardCharsets.UTF_8);
    }
}

package org.deepep4j.examples;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.io.ByteArrayOutputStream;
import java.io.PrintStream;
import java.nio.charset.StandardCharsets;
import org.junit.jupiter.api.Test;

class OptionsTest {
    @Test
    void defaultsAreTwoRanksEightExpertsTopTwoDeepep() throws Exception {
        Options o = Options.parse();
        assertEquals(2, o.ranks);
        assertEquals(8, o.experts);
        assertEquals(2, o.topK);
        assertEquals("deepep", o.dispatch);
        assertEquals(4, o.expertsPerRank());
        assertEquals(o.epochs * o.stepsPerEpoch, o.totalSteps());
    }

    @Test
    void parsesSpaceAndEqualsForms() throws Exception {
        Options o = Options.parse("--ranks", "4", "--experts=16", "--top-k", "3", "--dispatch", "ALLTOALL", "--steps=7",
                "--epochs", "2", "--lr", "0.5", "--seed", "-3");
        assertEquals(4, o.ranks);
        assertEquals(16, o.experts);
        assertEquals(3, o.topK);
        assertEquals("alltoall", o.dispatch);
        assertEquals(14, o.totalSteps());
        assertEquals(0.5, o.learningRate);
        assertEquals(-3, o.seed);
    }

    @Test
    void badFlagsNameFlagValueAndRule() {
        assertEquals("unknown flag '--expert'", message("--expert", "4"));
        assertEquals("--ranks 'two' must be a whole number", message("--ranks", "two"));
        assertEquals("--ranks 0 must be in 1..64", message("--ranks", "0"));
        assertEquals("--dispatch 'nccl' must be deepep or alltoall", message("--dispatch", "nccl"));
        assertEquals("--experts 6 must be a multiple of --ranks 4", message("--ranks", "4", "--experts", "6"));
        assertEquals("--top-k 9 must be at most --experts 8", message("--top-k", "9"));
        assertEquals("--lr -1 must be a finite number > 0", message("--lr", "-1"));
        assertEquals("--steps needs a value", message("--steps"));
        assertEquals("--hidden 6 must be a multiple of 4 (rows move as 16-byte vectors of fp32)", message("--hidden", "6"));
        assertEquals("--hidden 2 must be in 4..8192", message("--hidden", "2"));
    }

    @Test
    void cliExitsWithTwoOnBadFlagAndZeroOnHelp() {
        ByteArrayOutputStream out = new ByteArrayOutputStream();
        ByteArrayOutputStream err = new ByteArrayOutputStream();
        int code = Main.run(new String[] {"--tokens", "-5"}, print(out), print(err));
        assertEquals(2, code);
        String e = err.toString(StandardCharsets.UTF_8);
        assertTrue(e.contains("--tokens -5 must be in 1..1048576"), e);
        assertTrue(e.contains("--help"), e);

        code = Main.run(new String[] {"--help"}, print(out), print(err));
        assertEquals(0, code);
        String help = out.toString(StandardCharsets.UTF_8);
        for (String flag : new String[] {"--ranks", "--experts", "--top-k", "--dispatch", "--epochs", "--steps", "--out"}) {
            assertTrue(help.contains(flag), "help lacks " + flag);
        }
        assertTrue(help.contains("--hidden H         token width, a multiple of 4"), "help states the --hidden rule");

        // a flag the engine would refuse after the run started is refused up front, before any training
        out.reset();
        err.reset();
        code = Main.run(new String[] {"--hidden", "6"}, print(out), print(err));
        assertEquals(2, code);
        assertEquals("", out.toString(StandardCharsets.UTF_8), "nothing started");
        assertTrue(err.toString(StandardCharsets.UTF_8).contains("--hidden 6 must be a multiple of 4"));
    }

    private static String message(String... args) {
        return assertThrows(UsageException.class, () -> Options.parse(args)).getMessage();
    }

    private static PrintStream print(ByteArrayOutputStream b) {
        return new PrintStream(b, true, StandardCharsets.UTF_8);
    }
}

package org.deepep4j.examples;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.io.ByteArrayOutputStream;
import java.io.PrintStream;
import org.junit.jupiter.api.Test;

class ProgressBarTest {
    @Test
    void showsFillElapsedAndEta() {
        ProgressBar bar = new ProgressBar(new PrintStream(new ByteArrayOutputStream()), 40);
        // 10 of 40 steps in 30 s: 30 more steps at 3 s each = 90 s left.
        assertEquals("[#######.......................] 10/40 steps  00:30 elapsed  ETA 01:30  loss 1",
                bar.render(10, 30_000_000_000L, "loss 1"));
        assertEquals("[..............................] 0/40 steps  00:00 elapsed  ETA --:--  ", bar.render(0, 0, ""));
        assertEquals("[##############################] 40/40 steps  02:05 elapsed  ETA 00:00  ",
                bar.render(40, 125_000_000_000L, ""));
    }

    @Test
    void notATerminalGetsPlainLinesAtEveryTenth() {
        ByteArrayOutputStream b = new ByteArrayOutputStream();
        ProgressBar bar = new ProgressBar(new PrintStream(b, true), 600);
        assertFalse(bar.redraws(), "a PrintStream that is not stdout on a terminal");
        for (int done = 1; done <= 600; done++) bar.update(done, "loss 1");
        String log = b.toString();
        assertFalse(log.contains("\r"), "no carriage returns in a log");
        String[] lines = log.split("\n");
        assertEquals(10, lines.length, log);
        assertTrue(lines[0].contains(" 60/600 steps") && lines[9].contains(" 600/600 steps"), log);
    }

    @Test
    void aTerminalGetsOneLineRedrawnInPlace() {
        ByteArrayOutputStream b = new ByteArrayOutputStream();
        ProgressBar bar = new ProgressBar(new PrintStream(b, true), 3, true);
        for (int done = 1; done <= 3; done++) bar.update(done, "");
        assertEquals(3, b.toString().chars().filter(c -> c == '\r').count());
        assertEquals(1, b.toString().chars().filter(c -> c == '\n').count());
    }
}

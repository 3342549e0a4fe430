package org.deepep4j.examples;

import static org.junit.jupiter.api.Assertions.assertEquals;

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
}

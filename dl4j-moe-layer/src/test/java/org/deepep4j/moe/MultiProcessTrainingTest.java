package org.deepep4j.moe;

import org.deepep4j.moe.train.ExpertParallelTrainer;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;
import org.nd4j.linalg.api.ndarray.INDArray;
import org.nd4j.linalg.factory.Nd4j;

import java.io.File;
import java.net.ServerSocket;
import java.nio.file.Paths;
import java.util.concurrent.TimeUnit;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

/** Two JVMs meet through the TCP rendezvous and train like two in-process ranks. */
class MultiProcessTrainingTest {

    @Test
    void twoProcessesTrainLikeTwoThreads(@TempDir File dir) throws Exception {
        int port;
        try (ServerSocket s = new ServerSocket(0)) {
            port = s.getLocalPort();
        }
        String javaBin = Paths.get(System.getProperty("java.home"), "bin", "java").toString();
        Process[] ps = new Process[2];
        for (int r = 0; r < 2; r++) {
            ProcessBuilder pb = new ProcessBuilder(javaBin, "-Xmx1g", "-cp", System.getProperty("java.class.path"),
                    ProcessRankMain.class.getName(), String.valueOf(r), String.valueOf(port), "test-secret",
                    new File(dir, "rank" + r + ".bin").getPath());
            pb.environment().put("OMP_NUM_THREADS", "1");
            pb.redirectErrorStream(true).redirectOutput(new File(dir, "rank" + r + ".log"));
            ps[r] = pb.start();
        }
        for (int r = 0; r < 2; r++) {
            boolean done = ps[r].waitFor(180, TimeUnit.SECONDS);
            if (!done) {
                ps[r].destroyForcibly();
            }
            String log = new String(java.nio.file.Files.readAllBytes(new File(dir, "rank" + r + ".log").toPath()));
            assertTrue(done, "rank " + r + " did not finish within 180 s; log:\n" + log);
            assertEquals(0, ps[r].exitValue(), "rank " + r + " failed; log:\n" + log);
        }
        ExpertParallelTrainer threads = ExpertParallelTrainer.builder().ranks(2).network(ProcessRankMain.conf())
                .iterator(ProcessRankMain.data()).epochs(2).build();
        threads.fit();
        for (int r = 0; r < 2; r++) {
            INDArray got = Nd4j.readBinary(new File(dir, "rank" + r + ".bin"));
            INDArray expected = threads.replica(r).params();
            double diff = got.reshape(expected.shape()).sub(expected).amaxNumber().doubleValue();
            assertTrue(diff < 1e-5, "rank " + r + ": process and thread training differ by " + diff);
        }
    }
}

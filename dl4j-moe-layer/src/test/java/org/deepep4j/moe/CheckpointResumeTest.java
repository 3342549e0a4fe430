package org.deepep4j.moe;

import org.deepep4j.moe.train.Checkpoint;
import org.deepep4j.moe.train.ExpertParallelTrainer;
import org.deeplearning4j.datasets.iterator.utilty.ListDataSetIterator;
import org.deeplearning4j.nn.conf.MultiLayerConfiguration;
import org.deeplearning4j.nn.multilayer.MultiLayerNetwork;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;
import org.nd4j.linalg.api.buffer.DataType;
import org.nd4j.linalg.api.ndarray.INDArray;
import org.nd4j.linalg.dataset.DataSet;
import org.nd4j.linalg.learning.config.Adam;

import java.nio.file.Files;
import java.nio.file.Path;
import java.util.List;
import java.util.stream.Stream;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertNotEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

/**
 * Checkpoint and resume of expert-parallel training: a run resumed from a checkpoint ends with exactly the parameters
 * of the uninterrupted run (2 ranks, Adam, 64 examples in batches of 8: 4 rounds per epoch, 2 epochs = 8 iterations).
 */
class CheckpointResumeTest {

    private static final int HIDDEN = 8;

    private static List<DataSet> data() {
        return new DataSet(Nets.input(DataType.FLOAT, 31, 64, HIDDEN), Nets.labels(DataType.FLOAT, 32, 64)).asList();
    }

    private static MultiLayerConfiguration conf() {
        return Nets.ff(DataType.FLOAT, new Adam(1e-2), Nets.moe().sharedExpertFfnSize(4), HIDDEN);
    }

    private static ExpertParallelTrainer.Builder builder(int epochs) {
        return ExpertParallelTrainer.builder().ranks(2).iterator(new ListDataSetIterator<>(data(), 8)).epochs(epochs);
    }

    @Test
    void resumedRunEqualsUninterruptedRunExactly(@TempDir Path dir) {
        ExpertParallelTrainer full = builder(2).network(conf()).build();
        full.fit();
        INDArray expected = full.wholeNetwork().params().dup();

        // checkpoints after iterations 3 and 6 (epoch 1, round 2 of 4): the file holds the later one
        Path mid = dir.resolve("mid.ckpt");
        ExpertParallelTrainer withCheckpoints = builder(2).network(conf()).checkpoint(mid, 3).build();
        withCheckpoints.fit();
        assertEquals(expected, withCheckpoints.wholeNetwork().params(), "checkpointing changed the run");
        Checkpoint c = Checkpoint.read(mid);
        assertEquals(1, c.epoch());
        assertEquals(2, c.round());
        ExpertParallelTrainer resumedMid = builder(2).resumeFrom(mid).build();
        resumedMid.fit();
        assertEquals(expected, resumedMid.wholeNetwork().params(), "resumed mid-epoch");

        // N iterations, save, resume for N more
        Path half = dir.resolve("half.ckpt");
        builder(1).network(conf()).checkpoint(half, 4).build().fit();
        ExpertParallelTrainer resumed = builder(2).resumeFrom(half).build();
        assertNotEquals(expected, resumed.wholeNetwork().params(), "the checkpoint holds the half-way parameters");
        resumed.fit();
        assertEquals(expected, resumed.wholeNetwork().params(), "resumed at an epoch boundary");
        assertEquals(8, resumed.replica(1).getIterationCount());
        assertEquals(2, resumed.replica(0).getEpochCount());
    }

    @Test
    void failedWriteLeavesThePreviousCheckpoint(@TempDir Path dir) throws Exception {
        Path file = dir.resolve("run.ckpt");
        builder(1).network(conf()).checkpoint(file, 4).build().fit();
        byte[] before = Files.readAllBytes(file);
        // a directory where the checkpoint's temporary file should go: the write fails before the rename
        Path blocked = dir.resolve("blocked.ckpt");
        Files.createDirectories(blocked);
        Files.write(blocked.resolve("x"), new byte[1]);
        ExpertParallelTrainer t = builder(1).network(conf()).checkpoint(blocked, 4).build();
        IllegalStateException e = assertThrows(IllegalStateException.class, t::fit);
        assertTrue(e.toString().contains("checkpoint"), e.toString());
        assertTrue(Files.isDirectory(blocked), "the target is untouched");
        assertArrayEquals(before, Files.readAllBytes(file));
        try (Stream<Path> s = Files.list(dir)) {
            assertEquals(0, s.filter(p -> p.toString().endsWith(".partial")).count(), "no partial file left");
        }
        Checkpoint c = Checkpoint.read(file);
        assertEquals(0, c.epoch(), "the earlier checkpoint still reads");
        assertEquals(4, c.round());
    }

    @Test
    void startsFromAnExistingNetwork() {
        ExpertParallelTrainer first = builder(1).network(conf()).build();
        first.fit();
        MultiLayerNetwork trained = first.wholeNetwork();
        INDArray start = trained.params().dup();
        ExpertParallelTrainer next = builder(1).network(trained).build();
        assertEquals(start, next.wholeNetwork().params(), "every rank starts from the existing network");
        next.fit();
        assertEquals(start, trained.params(), "the existing network is copied, not changed");
        assertNotEquals(start, next.wholeNetwork().params(), "training went on");
    }

    @Test
    void resumeRefusesOtherRanksAndASecondModel(@TempDir Path dir) {
        Path file = dir.resolve("run.ckpt");
        builder(1).network(conf()).checkpoint(file, 4).build().fit();
        IllegalArgumentException e = assertThrows(IllegalArgumentException.class, () -> ExpertParallelTrainer.builder()
                .ranks(4).iterator(new ListDataSetIterator<>(data(), 8)).resumeFrom(file).build());
        assertTrue(e.getMessage().contains("ranks=4") && e.getMessage().contains("2 ranks"), e.getMessage());
        IllegalStateException s = assertThrows(IllegalStateException.class, () -> builder(1).network(conf()).resumeFrom(file));
        assertTrue(s.getMessage().contains("network(configuration)"), s.getMessage());
    }
}

package org.deepep4j.moe;

import org.deepep4j.moe.train.Checkpoint;
import org.deepep4j.moe.train.ExpertParallelTrainer;
import org.deeplearning4j.datasets.iterator.utilty.ListDataSetIterator;
import org.deeplearning4j.nn.api.Model;
import org.deeplearning4j.nn.conf.MultiLayerConfiguration;
import org.deeplearning4j.nn.graph.ComputationGraph;
import org.deeplearning4j.nn.multilayer.MultiLayerNetwork;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;
import org.junit.jupiter.params.ParameterizedTest;
import org.junit.jupiter.params.provider.EnumSource;
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
 * of the uninterrupted run (2 ranks, Adam, 64 examples in batches of 8: 4 rounds per epoch, 2 epochs = 8 iterations),
 * for the model as a MultiLayerNetwork and as a ComputationGraph.
 */
class CheckpointResumeTest {

    private static final int HIDDEN = 8;

    private static List<DataSet> data() {
        return new DataSet(Nets.input(DataType.FLOAT, 31, 64, HIDDEN), Nets.labels(DataType.FLOAT, 32, 64)).asList();
    }

    private static MultiLayerConfiguration conf() {
        return Nets.ff(DataType.FLOAT, new Adam(1e-2), Nets.moe().sharedExpertFfnSize(4), HIDDEN);
    }

    /** The same small MoE model in each network kind the trainer takes. */
    enum Kind {
        MULTI_LAYER, GRAPH;

        ExpertParallelTrainer.Builder network(ExpertParallelTrainer.Builder b) {
            return this == GRAPH
                    ? b.network(Nets.graph(DataType.FLOAT, new Adam(1e-2), Nets.moe().sharedExpertFfnSize(4), HIDDEN))
                    : b.network(conf());
        }

        ExpertParallelTrainer.Builder network(ExpertParallelTrainer.Builder b, Model existing) {
            return this == GRAPH ? b.network((ComputationGraph) existing) : b.network((MultiLayerNetwork) existing);
        }

        Model whole(ExpertParallelTrainer t) {
            return this == GRAPH ? t.wholeGraph() : t.wholeNetwork();
        }

        int iterations(ExpertParallelTrainer t, int rank) {
            return this == GRAPH ? t.replicaGraph(rank).getIterationCount() : t.replica(rank).getIterationCount();
        }

        int epochs(ExpertParallelTrainer t, int rank) {
            return this == GRAPH ? t.replicaGraph(rank).getEpochCount() : t.replica(rank).getEpochCount();
        }
    }

    private static ExpertParallelTrainer.Builder builder(int epochs) {
        return ExpertParallelTrainer.builder().ranks(2).iterator(new ListDataSetIterator<>(data(), 8)).epochs(epochs);
    }

    @ParameterizedTest
    @EnumSource(Kind.class)
    void resumedRunEqualsUninterruptedRunExactly(Kind kind, @TempDir Path dir) {
        ExpertParallelTrainer full = kind.network(builder(2)).build();
        full.fit();
        INDArray expected = kind.whole(full).params().dup();

        // checkpoints after iterations 3 and 6 (epoch 1, round 2 of 4): the file holds the later one
        Path mid = dir.resolve("mid.ckpt");
        ExpertParallelTrainer withCheckpoints = kind.network(builder(2)).checkpoint(mid, 3).build();
        withCheckpoints.fit();
        assertEquals(expected, kind.whole(withCheckpoints).params(), "checkpointing changed the run");
        Checkpoint c = Checkpoint.read(mid);
        assertEquals(1, c.epoch());
        assertEquals(2, c.round());
        ExpertParallelTrainer resumedMid = builder(2).resumeFrom(mid).build();
        resumedMid.fit();
        assertEquals(expected, kind.whole(resumedMid).params(), "resumed mid-epoch");

        // N iterations, save, resume for N more
        Path half = dir.resolve("half.ckpt");
        kind.network(builder(1)).checkpoint(half, 4).build().fit();
        ExpertParallelTrainer resumed = builder(2).resumeFrom(half).build();
        assertNotEquals(expected, kind.whole(resumed).params(), "the checkpoint holds the half-way parameters");
        resumed.fit();
        assertEquals(expected, kind.whole(resumed).params(), "resumed at an epoch boundary");
        assertEquals(8, kind.iterations(resumed, 1));
        assertEquals(2, kind.epochs(resumed, 0));
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

    @ParameterizedTest
    @EnumSource(Kind.class)
    void startsFromAnExistingNetwork(Kind kind) {
        ExpertParallelTrainer first = kind.network(builder(1)).build();
        first.fit();
        Model trained = kind.whole(first);
        INDArray start = trained.params().dup();
        ExpertParallelTrainer next = kind.network(builder(1), trained).build();
        assertEquals(start, kind.whole(next).params(), "every rank starts from the existing network");
        next.fit();
        assertEquals(start, trained.params(), "the existing network is copied, not changed");
        assertNotEquals(start, kind.whole(next).params(), "training went on");
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

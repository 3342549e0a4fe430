package org.deepep4j.moe;

import org.deepep4j.EpConfig;
import org.deepep4j.EpGroup;
import org.deepep4j.moe.train.ExpertParallelTrainer;
import org.deeplearning4j.datasets.iterator.utilty.ListDataSetIterator;
import org.deeplearning4j.nn.conf.MultiLayerConfiguration;
import org.nd4j.linalg.api.buffer.DataType;
import org.nd4j.linalg.dataset.DataSet;
import org.nd4j.linalg.factory.Nd4j;
import org.nd4j.linalg.learning.config.Adam;

import java.io.File;
import java.time.Duration;

/** One rank of the two-process training in {@link MultiProcessTrainingTest}: args rank port secret outFile. */
public final class ProcessRankMain {

    static final int HIDDEN = 8;

    static MultiLayerConfiguration conf() {
        return Nets.ff(DataType.FLOAT, new Adam(1e-2), Nets.moe().sharedExpertFfnSize(4), HIDDEN);
    }

    static ListDataSetIterator<DataSet> data() {
        return new ListDataSetIterator<>(new DataSet(Nets.input(DataType.FLOAT, 51, 48, HIDDEN),
                Nets.labels(DataType.FLOAT, 52, 48)).asList(), 8);
    }

    public static void main(String[] args) throws Exception {
        int rank = Integer.parseInt(args[0]);
        int port = Integer.parseInt(args[1]);
        try (EpGroup group = EpGroup.tcp(rank, 2, "127.0.0.1", port, args[2], Duration.ofSeconds(60))) {
            ExpertParallelTrainer t = ExpertParallelTrainer.builder()
                    .group(group, EpConfig.builder().bufferSizeGb(0.0625).build())
                    .network(conf()).iterator(data()).epochs(2).build();
            t.fit();
            Nd4j.saveBinary(t.replica(rank).params(), new File(args[3]));
        }
        System.exit(0);
    }
}

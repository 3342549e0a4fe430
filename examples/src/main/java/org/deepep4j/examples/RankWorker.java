package org.deepep4j.examples;

import java.util.SplittableRandom;
import java.util.function.IntConsumer;
import org.deepep4j.EpBuffer;
import org.deepep4j.EpCombineResult;
import org.deepep4j.EpDispatchResult;
import org.deepep4j.EpHandle;
import org.nd4j.linalg.api.buffer.DataType;
import org.nd4j.linalg.api.ndarray.INDArray;
import org.nd4j.linalg.factory.Nd4j;
import org.nd4j.linalg.ops.transforms.Transforms;

/**
 * One rank's training loop. The router is replicated (its gradient is averaged over ranks); the experts are sharded
 * (rank r owns experts r*E/R .. (r+1)*E/R-1) and see every token routed to them through dispatch.
 */
final class RankWorker {
    private final Options o;
    private final int rank;
    private final EpBuffer buffer;
    private final TaskMixture data;
    private final ReplicaReduce reduce;
    private final Router router;
    private final INDArray gate;
    private final Adam gateAdam;
    private final ExpertShard experts;
    private final Adam expertAdam;
    final PhaseTimer timer = new PhaseTimer();
    final double[] stepLoss;
    final long[][] taskExpert;
    final long[] receivedPerLocalExpert;

    RankWorker(Options o, int rank, EpBuffer buffer, TaskMixture data, ReplicaReduce reduce) {
        this.o = o;
        this.rank = rank;
        this.buffer = buffer;
        this.data = data;
        this.reduce = reduce;
        this.router = new Router(o.experts, o.topK, 0.01);
        // Same seed on every rank: the replicas start equal and stay equal (same averaged gradient, same update).
        this.gate = ExpertShard.uniform(new SplittableRandom(o.seed), o.hidden, o.experts, 0.01);
        this.gateAdam = new Adam(gate, o.learningRate);
        int local = o.expertsPerRank();
        this.experts = new ExpertShard(rank * local, local, o.hidden, o.expertHidden, o.seed);
        this.expertAdam = new Adam(experts.flatParams(), o.learningRate);
        this.stepLoss = new double[o.totalSteps()];
        this.taskExpert = new long[o.tasks][o.experts];
        this.receivedPerLocalExpert = new long[local];
    }

    /** Runs every step; {@code afterStep} is called with the finished step count (rank 0 draws the progress bar). */
    void train(IntConsumer afterStep) {
        for (int step = 0; step < o.totalSteps(); step++) {
            stepLoss[step] = step(step);
            afterStep.accept(step + 1);
        }
        timer.stop();
    }

    private double step(int step) {
        timer.start("data");
        TaskMixture.Batch batch = data.batch(rank, step, o.tokensPerRank);
        int n = o.tokensPerRank;

        timer.start("route");
        Router.Routing routing = router.forward(batch.x(), gate);
        countTasks(batch.task(), routing.topkIdx());

        timer.start("dispatch");
        EpDispatchResult d = buffer.dispatch(batch.x(), routing.topkIdxArray(), routing.topkWeightsArray(), o.experts);
        EpHandle handle = d.handle();
        try {
            int[] perExpert = d.recvTokensPerExpert();
            for (int e = 0; e < perExpert.length; e++) receivedPerLocalExpert[e] += perExpert[e];

            timer.start("experts");
            INDArray expertOut = experts.forward(d.recvX(), d.recvTopkIdx(), d.recvTopkWeights());

            timer.start("combine");
            INDArray out = buffer.combine(expertOut, handle, null);

            timer.start("loss");
            // Loss = mean over ranks of each rank's mean squared error; its gradient carries the 1/R.
            INDArray diff = out.sub(batch.y());
            double localLoss = diff.mul(diff).meanNumber().doubleValue();
            INDArray gradOut = diff.muli(2.0 / ((double) n * o.hidden * o.ranks));

            timer.start("backward dispatch");
            // Combine sums rows from the ranks a token visited, so its backward is a dispatch of the output
            // gradient along the same routes: the cached handle replays them.
            INDArray gradExpertOut = buffer.dispatch(gradOut, handle);

            timer.start("experts backward");
            float[] gradSlotWeights = experts.backward(gradExpertOut);

            timer.start("backward combine");
            // Each slot's weight gradient is known where its expert lives; combine's top-k column sums them home
            // (every other rank contributes 0 for that slot). The rows themselves carry nothing here: zeros.
            int m = (int) d.recvX().size(0);
            INDArray slotGrads = Nd4j.create(gradSlotWeights, new long[] {m, o.topK}, DataType.FLOAT);
            EpCombineResult home = buffer.combine(Nd4j.zeros(DataType.FLOAT, m, o.hidden), handle, null, slotGrads);
            float[] gradWeights = home.outTopkWeights().data().asFloat();

            timer.start("router backward");
            INDArray gateGrad = reduce.mean(rank, router.backward(routing, gradWeights));
            double loss = reduce.mean(rank, Nd4j.scalar(localLoss)).getDouble(0);

            timer.start("update");
            gateAdam.step(gate, gateGrad);
            expertAdam.step(experts.flatParams(), experts.flatGrads());
            return loss;
        } finally {
            handle.close();
        }
    }

    private void countTasks(int[] task, long[] topkIdx) {
        for (int t = 0; t < task.length; t++) {
            for (int k = 0; k < o.topK; k++) taskExpert[task[t]][(int) topkIdx[t * o.topK + k]]++;
        }
    }

    /** Sum of absolute differences to another array, used to confirm replicas stayed equal. */
    static double distance(INDArray a, INDArray b) {
        return Transforms.abs(a.sub(b), false).sumNumber().doubleValue();
    }

    INDArray gate() {
        return gate;
    }
}

package org.deepep4j.moe.train;

import org.deepep4j.moe.exchange.ExpertExchange;
import org.deepep4j.EpBuffer;
import org.deepep4j.EpConfig;
import org.deepep4j.EpGroup;
import org.deepep4j.EpPeerException;
import org.deepep4j.EpTimeoutException;
import org.deepep4j.moe.exchange.EpBufferExchange;
import org.deepep4j.moe.layers.MoELayerImpl;
import org.deeplearning4j.nn.api.Layer;
import org.deeplearning4j.nn.api.Model;
import org.deeplearning4j.nn.conf.ComputationGraphConfiguration;
import org.deeplearning4j.nn.conf.MultiLayerConfiguration;
import org.deeplearning4j.nn.graph.ComputationGraph;
import org.deeplearning4j.nn.multilayer.MultiLayerNetwork;
import org.deeplearning4j.optimize.api.TrainingListener;
import org.nd4j.linalg.dataset.api.iterator.DataSetIterator;
import org.nd4j.linalg.dataset.api.iterator.MultiDataSetIterator;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

import java.nio.file.Path;
import java.time.Duration;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.List;
import java.util.concurrent.BrokenBarrierException;
import java.util.concurrent.CyclicBarrier;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.Future;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.TimeoutException;
import java.util.function.IntFunction;
import java.util.function.Supplier;

/**
 * Trains a {@link MultiLayerNetwork} or a {@link ComputationGraph} with MoE layers expert-parallel on R ranks that are
 * threads of this JVM (or processes of a multi-process group), fed by a DataSetIterator or a MultiDataSetIterator.
 * The whole model is built once from the configuration (so its weights do not depend on R); rank r gets a replica with
 * every replicated parameter and experts [r*E/R, (r+1)*E/R). Each step every rank fits its own minibatch from the
 * shared iterator (batches are dealt round-robin; a last round with fewer than R batches is dropped), MoE layers move
 * tokens through deepep4j's engine (one {@link EpBuffer} per rank), and gradients are averaged before the updater runs.
 * <pre>
 * ExpertParallelTrainer t = ExpertParallelTrainer.builder().group(EpGroup.inProcess(2), EpConfig.defaults())
 *         .network(conf).iterator(it).epochs(3).build();
 * t.fit();
 * MultiLayerNetwork trained = t.wholeNetwork();   // for a ComputationGraphConfiguration: t.wholeGraph()
 * </pre>
 */
public final class ExpertParallelTrainer {

    private static final Logger log = LoggerFactory.getLogger(ExpertParallelTrainer.class);

    private final int ranks;
    /** Exactly one of these feeds the run. */
    private final DataSetIterator iterator;
    private final MultiDataSetIterator multiIterator;
    private final int epochs;
    private final List<TrainingListener> listeners;
    private final IntFunction<List<TrainingListener>> rankListeners;
    private final IntFunction<ExpertExchange> exchanges;
    private final Duration timeout;
    private final boolean phaseTiming;
    private final NetworkAdapter[] replicas;
    private final NetworkAdapter whole;
    /** Set when the ranks are processes: this process runs rank {@code processGroup.processRank()} only. */
    private final EpGroup processGroup;
    /** The group whose buffers carry the tokens; null when the exchanges come from {@link Builder#exchanges}. */
    private final EpGroup group;
    /** Where and how often (iterations) the run is checkpointed; null / 0 for never. */
    private final Path checkpointFile;
    private final int checkpointEvery;
    /** Where fit() starts: epoch and rounds of it already done (from a checkpoint, else 0, 0). */
    private final int startEpoch;
    private final int startRound;
    private CyclicBarrier checkpointBarrier;
    private volatile int checkpointEpoch;
    private volatile int checkpointRound;

    private ExpertParallelTrainer(Builder b) {
        this.ranks = b.ranks;
        this.processGroup = b.processGroup;
        this.group = b.group;
        this.checkpointFile = b.checkpointFile;
        this.checkpointEvery = b.checkpointEvery;
        Checkpoint resume = b.resume;
        this.startEpoch = resume != null ? resume.epoch : 0;
        this.startRound = resume != null ? resume.round : 0;
        this.iterator = b.iterator;
        this.multiIterator = b.multiIterator;
        this.epochs = b.epochs;
        this.listeners = b.listeners;
        this.rankListeners = b.rankListeners;
        this.timeout = b.timeout;
        this.phaseTiming = b.phaseTiming;
        this.exchanges = b.exchanges;
        whole = b.model.get();
        if (iterator != null) {
            whole.requireFedByDataSets();
        }
        if (resume != null) {
            // every rank's replica as saved: parameters, updater state, iteration and epoch counts
            replicas = resume.replicas;
            return;
        }
        replicas = new NetworkAdapter[ranks];
        for (int r = 0; r < ranks; r++) {
            if (processGroup != null && r != processGroup.processRank()) {
                continue; // another process holds that replica
            }
            replicas[r] = whole.withEpSize(ranks);
            ExpertSharding.scatter(whole.model(), replicas[r].model(), r);
        }
    }

    public static Builder builder() {
        return new Builder();
    }

    /**
     * Runs all epochs on all ranks. When a rank fails, the others stop at their next collective call with an error
     * naming it, and this throws an {@link IllegalStateException} whose message starts with that rank and its root
     * cause ("rank 1 failed: java.lang.IllegalArgumentException: ..."), the root cause as its cause and the other
     * ranks' consequent errors suppressed.
     */
    public void fit() {
        if (group != null) {
            group.requireOpen("ExpertParallelTrainer.fit");
        }
        if (processGroup != null) {
            int rank = processGroup.processRank();
            try {
                runRank(rank, new GradientAverager(processGroup, timeout), batches());
            } catch (RuntimeException | Error e) {
                throw rankFailure(new Throwable[]{e}, rank);
            }
            return;
        }
        GradientAverager averager = new GradientAverager(ranks, timeout);
        RoundRobinBatches<?> batches = batches();
        checkpointBarrier = new CyclicBarrier(ranks,
                () -> Checkpoint.write(checkpointFile, whole, replicas, checkpointEpoch, checkpointRound));
        ExecutorService pool = Executors.newFixedThreadPool(ranks, r -> {
            Thread t = new Thread(r, "ep-rank");
            t.setDaemon(true);
            return t;
        });
        try {
            List<Future<?>> futures = new ArrayList<>();
            for (int r = 0; r < ranks; r++) {
                final int rank = r;
                futures.add(pool.submit(() -> {
                    runRank(rank, averager, batches);
                    return null;
                }));
            }
            Throwable[] failures = new Throwable[ranks];
            boolean failed = false;
            for (int r = 0; r < ranks; r++) {
                try {
                    futures.get(r).get();
                } catch (java.util.concurrent.ExecutionException e) {
                    failures[r] = e.getCause();
                    failed = true;
                } catch (InterruptedException e) {
                    Thread.currentThread().interrupt();
                    throw new IllegalStateException("interrupted while waiting for rank " + r, e);
                }
            }
            if (failed) {
                throw rankFailure(failures, 0);
            }
        } finally {
            pool.shutdownNow();
            try {
                pool.awaitTermination(timeout.toMillis(), TimeUnit.MILLISECONDS);
            } catch (InterruptedException e) {
                Thread.currentThread().interrupt();
            }
        }
    }

    /**
     * One exception for the failures of a step, root cause first: the lowest rank whose failure is its own (not a
     * peer's error passed on, not a stop because a peer failed), timeouts after other causes.
     * @param firstRank rank of {@code failures[0]}
     */
    private static IllegalStateException rankFailure(Throwable[] failures, int firstRank) {
        int root = -1;
        for (int pass = 0; pass < 3 && root < 0; pass++) {
            for (int r = 0; r < failures.length && root < 0; r++) {
                Throwable t = failures[r];
                boolean consequence = t instanceof EpPeerException || t instanceof RankAbortedException;
                boolean timeout = t instanceof EpTimeoutException;
                if (t != null && (pass == 2 || (!consequence && (pass == 1 || !timeout)))) {
                    root = r;
                }
            }
        }
        Throwable cause = failures[root];
        IllegalStateException e = new IllegalStateException("rank " + (firstRank + root) + " failed: " + cause, cause);
        for (int r = 0; r < failures.length; r++) {
            if (r != root && failures[r] != null) {
                e.addSuppressed(failures[r]);
            }
        }
        return e;
    }

    /** The batches of the run's iterator, from where it starts (a resume skips the rounds done). */
    private RoundRobinBatches<?> batches() {
        return iterator != null ? RoundRobinBatches.of(iterator, ranks, startEpoch, startRound)
                : RoundRobinBatches.of(multiIterator, ranks, startEpoch, startRound);
    }

    private void runRank(int rank, GradientAverager averager, RoundRobinBatches<?> batches) {
        NetworkAdapter net = replicas[rank];
        ExpertExchange ex = null;
        try {
            ex = exchanges.apply(rank);
            for (Layer l : net.layersInParamOrder()) {
                if (l instanceof MoELayerImpl) {
                    ((MoELayerImpl) l).setExchange(ex);
                }
            }
            List<TrainingListener> ls = new ArrayList<>();
            ls.add(averager.listener(rank, net));
            if (phaseTiming) {
                ls.add(new PhaseTimingListener("rank " + rank + " "));
            }
            if (rankListeners != null) {
                ls.addAll(rankListeners.apply(rank));
            }
            if (rank == 0) {
                ls.addAll(listeners);
            }
            net.model().setListeners(ls);
            fitRank(net, ls, batches, rank);
            ex.finish();
        } catch (RuntimeException | Error e) {
            // a failure of this rank alone: the peers must hear of it now, not after their timeout
            averager.abort("rank " + rank + " failed: " + e);
            if (checkpointBarrier != null) {
                checkpointBarrier.reset();  // ranks waiting to checkpoint stop now
            }
            if (ex != null) {
                ex.fail(e.toString());
            }
            throw e;
        } finally {
            net.model().clear();
            if (ex != null) {
                ex.close();
            }
        }
    }

    private void fitRank(NetworkAdapter net, List<TrainingListener> ls, RoundRobinBatches<?> batches, int rank) {
        for (int epoch = startEpoch; epoch < epochs; epoch++) {
            for (int step = epoch == startEpoch ? startRound : 0; ; step++) {
                if (!batches.fitNext(net, epoch, step, rank)) {
                    break;
                }
                if (checkpointEvery > 0 && net.iterationCount() % checkpointEvery == 0) {
                    checkpoint(rank, epoch, step + 1);
                }
            }
            for (TrainingListener l : ls) {
                l.onEpochEnd(net.model());
            }
            net.incrementEpochCount();
        }
        if (rank == 0) {
            log.info("expert-parallel training on {} ranks done: {} epochs", ranks, epochs);
        }
    }

    /** Every rank arrives after the same step; the last to arrive writes the checkpoint, then all go on. */
    private void checkpoint(int rank, int epoch, int round) {
        if (rank == 0) {
            checkpointEpoch = epoch;
            checkpointRound = round;
        }
        try {
            checkpointBarrier.await(timeout.toMillis(), TimeUnit.MILLISECONDS);
        } catch (InterruptedException e) {
            Thread.currentThread().interrupt();
            throw new RankAbortedException("checkpoint rank " + rank + ": interrupted");
        } catch (BrokenBarrierException e) {
            throw new RankAbortedException("checkpoint rank " + rank + ": stopped because another rank failed"
                    + " or the checkpoint could not be written");
        } catch (TimeoutException e) {
            throw new IllegalStateException("checkpoint rank " + rank + ": timed out after " + timeout
                    + " waiting for the other ranks");
        }
    }

    /**
     * Rank {@code r}'s replica (its experts only) of a MultiLayerNetwork; in a multi-process group only this process's
     * rank.
     */
    public MultiLayerNetwork replica(int r) {
        return as(MultiLayerNetwork.class, replicaOf(r), "replica(" + r + ")", "replicaGraph(" + r + ")");
    }

    /** Rank {@code r}'s replica (its experts only) of a ComputationGraph; see {@link #replica}. */
    public ComputationGraph replicaGraph(int r) {
        return as(ComputationGraph.class, replicaOf(r), "replicaGraph(" + r + ")", "replica(" + r + ")");
    }

    private NetworkAdapter replicaOf(int r) {
        if (r < 0 || r >= ranks) {
            throw new IllegalArgumentException("rank=" + r + ": must be in [0, " + ranks + ")");
        }
        if (replicas[r] == null) {
            throw new IllegalArgumentException("rank=" + r + ": its replica lives in another process (this process is rank "
                    + processGroup.processRank() + ")");
        }
        return replicas[r];
    }

    /** {@code net}'s network as {@code type}, or a message naming the accessor that fits the trained kind. */
    private static <T extends Model> T as(Class<T> type, NetworkAdapter net, String call, String instead) {
        if (!type.isInstance(net.model())) {
            throw new IllegalStateException(call + ": the trained network is a " + net.kind() + "; use " + instead);
        }
        return type.cast(net.model());
    }

    public int ranks() {
        return ranks;
    }

    /** The whole MultiLayerNetwork (epSize 1, every expert) with the current parameters of all ranks. */
    public MultiLayerNetwork wholeNetwork() {
        return as(MultiLayerNetwork.class, gathered("wholeNetwork"), "wholeNetwork()", "wholeGraph()");
    }

    /** The whole ComputationGraph (epSize 1, every expert) with the current parameters of all ranks. */
    public ComputationGraph wholeGraph() {
        return as(ComputationGraph.class, gathered("wholeGraph"), "wholeGraph()", "wholeNetwork()");
    }

    private NetworkAdapter gathered(String call) {
        if (processGroup != null) {
            throw new IllegalStateException(call + ": in a multi-process group each process holds only its experts;"
                    + " use replica(rank) or replicaGraph(rank)");
        }
        for (int r = 0; r < ranks; r++) {
            // replicas' engine blocks bring their views up to date first
            ExpertSharding.gather(replicas[r].model(), whole.model(), r);
        }
        org.deepep4j.moe.layers.EngineBlocks.reload(whole.model());  // the whole model's own engine blocks take them
        return whole;
    }

    /**
     * Configuration of an {@link ExpertParallelTrainer}. The ranks come from exactly one of {@link #group},
     * {@link #ranks} or {@link #exchanges}; setting a second one (or the same one twice) is refused naming the first,
     * so no setting silently overrides another.
     */
    public static final class Builder {
        private int ranks;
        /** Which setting chose the ranks, for the message when another one tries to. */
        private String ranksSetBy;
        /** Makes the whole model at build(): from a configuration, a copy of an existing network or a checkpoint. */
        private Supplier<NetworkAdapter> model;
        private DataSetIterator iterator;
        private MultiDataSetIterator multiIterator;
        private int epochs = 1;
        private List<TrainingListener> listeners = new ArrayList<>();
        private IntFunction<List<TrainingListener>> rankListeners;
        private IntFunction<ExpertExchange> exchanges;
        private Duration timeout = Duration.ofSeconds(120);
        private boolean phaseTiming = PhaseTimingListener.enabledByEnvironment();
        private EpGroup processGroup;
        private EpGroup group;
        private Checkpoint resume;
        private Path checkpointFile;
        private int checkpointEvery;
        /** Which setting chose the starting model, for the message when another one tries to. */
        private String modelSetBy;

        private void setModel(String setting, Supplier<NetworkAdapter> model) {
            if (modelSetBy != null) {
                throw new IllegalStateException(setting + ": the model was already set by " + modelSetBy
                        + "; network(configuration), network(existing network) and resumeFrom(checkpoint) are"
                        + " alternatives, set one of them once");
            }
            modelSetBy = setting;
            this.model = model;
        }

        private void setRanks(String setting, int ranks) {
            if (ranksSetBy != null) {
                throw new IllegalStateException(setting + ": the ranks were already set by " + ranksSetBy
                        + "; group(...), ranks(...) and exchanges(...) are alternatives, set one of them once");
            }
            if (ranks < 1) {
                throw new IllegalArgumentException("ranks=" + ranks + ": must be >= 1");
            }
            this.ranksSetBy = setting;
            this.ranks = ranks;
        }

        /**
         * Moves tokens through deepep4j's native engine: one {@link EpBuffer} per rank of {@code group}, made with
         * {@code config} on the rank's thread and closed after {@link #fit()}. With an in-process group all ranks run
         * here; with a multi-process group ({@code EpGroup.fromEnvironment()}) this process runs its own rank, reads
         * the same iterator as the others and keeps the batches dealt to it, and gradients are averaged through the
         * group.
         */
        public Builder group(EpGroup group, EpConfig config) {
            if (group == null) {
                throw new IllegalArgumentException("group=null: an EpGroup is required");
            }
            if (config == null) {
                throw new IllegalArgumentException("config=null: an EpConfig is required");
            }
            group.requireOpen("ExpertParallelTrainer.Builder.group");
            setRanks("group(" + (group.isInProcess() ? "in-process" : "multi-process") + " EpGroup of " + group.size()
                    + " ranks)", group.size());
            this.group = group;
            this.processGroup = group.isInProcess() ? null : group;
            this.exchanges = rank -> new EpBufferExchange(group.buffer(rank, config), true);
            return this;
        }

        /**
         * Shorthand for {@code group(EpGroup.inProcess(ranks), EpConfig.defaults())}: {@code ranks} threads of this
         * JVM, tokens moved by the engine's CPU backend. MoE layers' numExperts must be divisible by it.
         */
        public Builder ranks(int ranks) {
            setRanks("ranks(" + ranks + ")", ranks);
            EpGroup group = EpGroup.inProcess(ranks);
            EpConfig config = EpConfig.defaults();
            this.group = group;
            this.exchanges = rank -> new EpBufferExchange(group.buffer(rank, config), true);
            return this;
        }

        /**
         * {@code ranks} in-process ranks whose exchanges come from {@code perRank}, called once on each rank's own
         * thread (making a native EpBuffer is collective). For transports of your own or a reference exchange in
         * tests; {@link #group} is the engine's path.
         */
        public Builder exchanges(int ranks, IntFunction<ExpertExchange> perRank) {
            if (perRank == null) {
                throw new IllegalArgumentException("exchanges=null: a function from rank to ExpertExchange is required");
            }
            setRanks("exchanges(" + ranks + ", ...)", ranks);
            this.exchanges = perRank;
            return this;
        }

        /** The whole model's configuration (MoE layers with epSize 1). */
        public Builder network(MultiLayerConfiguration conf) {
            requireNonNull(conf, "conf", "a MultiLayerConfiguration");
            setModel("network(configuration)", () -> NetworkAdapter.build(conf));
            return this;
        }

        /**
         * The whole model as a graph (MoE layer vertices with epSize 1). A DataSetIterator feeds only a graph with
         * one input and one output (others are refused at {@link #build}); give a graph with several a
         * MultiDataSetIterator.
         */
        public Builder network(ComputationGraphConfiguration conf) {
            requireNonNull(conf, "conf", "a ComputationGraphConfiguration");
            setModel("network(configuration)", () -> NetworkAdapter.build(conf));
            return this;
        }

        /**
         * Starts from the parameters of {@code existing} (a whole model: MoE layers with epSize 1), e.g. one trained
         * before or restored with ModelSerializer; it is copied, not changed. Its updater state is not carried over
         * (the updaters start fresh); to continue a run exactly, use {@link #resumeFrom}.
         */
        public Builder network(MultiLayerNetwork existing) {
            requireNonNull(existing, "existing", "an initialised MultiLayerNetwork");
            setModel("network(existing network)", () -> NetworkAdapter.of(existing).copy());
            return this;
        }

        /** Starts from the parameters of the graph {@code existing}; as {@link #network(MultiLayerNetwork)}. */
        public Builder network(ComputationGraph existing) {
            requireNonNull(existing, "existing", "an initialised ComputationGraph");
            setModel("network(existing network)", () -> NetworkAdapter.of(existing).copy());
            return this;
        }

        private static void requireNonNull(Object value, String name, String what) {
            if (value == null) {
                throw new IllegalArgumentException(name + "=null: pass " + what);
            }
        }

        /**
         * Continues the run saved in {@code checkpoint} exactly: every rank's parameters, updater state, iteration
         * and epoch counts, and the data position (the iterator is reset and the rounds already done are skipped).
         * {@link #epochs} stays the total count of the run. The ranks must equal the checkpoint's, and the iterator
         * must give the same batches in the same order.
         */
        public Builder resumeFrom(Path checkpoint) {
            if (checkpoint == null) {
                throw new IllegalArgumentException("checkpoint=null: pass the file written by checkpoint(file, every)");
            }
            setModel("resumeFrom(" + checkpoint + ")", () -> resume.newWhole());
            this.resume = Checkpoint.read(checkpoint);
            return this;
        }

        /**
         * Writes a {@link Checkpoint} of the run to {@code file} after every {@code everyIterations} iterations (counted
         * over the whole run, resumes included), replacing the previous one atomically. In-process ranks only.
         */
        public Builder checkpoint(Path file, int everyIterations) {
            if (file == null) {
                throw new IllegalArgumentException("file=null: pass the checkpoint file");
            }
            if (everyIterations < 1) {
                throw new IllegalArgumentException("everyIterations=" + everyIterations + ": must be >= 1");
            }
            this.checkpointFile = file;
            this.checkpointEvery = everyIterations;
            return this;
        }

        /** The batches, dealt round-robin to the ranks (each round one per rank). */
        public Builder iterator(DataSetIterator iterator) {
            if (multiIterator != null) {
                throw new IllegalStateException("iterator(DataSetIterator): a MultiDataSetIterator was already set;"
                        + " give one iterator");
            }
            this.iterator = iterator;
            return this;
        }

        /** The batches as MultiDataSets, for a ComputationGraph with several inputs or outputs. */
        public Builder iterator(MultiDataSetIterator iterator) {
            if (this.iterator != null) {
                throw new IllegalStateException("iterator(MultiDataSetIterator): a DataSetIterator was already set;"
                        + " give one iterator");
            }
            this.multiIterator = iterator;
            return this;
        }

        public Builder epochs(int epochs) { this.epochs = epochs; return this; }
        /** Listeners of rank 0's replica. */
        public Builder listeners(TrainingListener... l) { this.listeners = new ArrayList<>(Arrays.asList(l)); return this; }
        /**
         * Listeners of every rank's replica: {@code perRank} is called once per rank, on the rank's thread after its
         * exchange is made, and the listeners run on that thread after the gradients are averaged (so
         * {@code iterationDone} sees the rank's own score, routing and phase times of that step).
         */
        public Builder rankListeners(IntFunction<List<TrainingListener>> perRank) { this.rankListeners = perRank; return this; }

        /**
         * Logs every rank's per-phase times (routing, dispatch, expert compute, combine) per MoE layer and iteration
         * at INFO through {@link PhaseTimingListener}. Default: on when the environment has {@code DEEPEP4J_DEBUG_EP=1}.
         */
        public Builder phaseTiming(boolean on) { this.phaseTiming = on; return this; }

        /** Bound on every wait between ranks. */
        public Builder timeout(Duration timeout) { this.timeout = timeout; return this; }

        public ExpertParallelTrainer build() {
            if (ranksSetBy == null) {
                throw new IllegalArgumentException("ranks=unset: call group(EpGroup, EpConfig) (or ranks(int) for"
                        + " in-process ranks with EpConfig defaults)");
            }
            if (modelSetBy == null) {
                throw new IllegalArgumentException("network=null: a MultiLayerConfiguration or"
                        + " ComputationGraphConfiguration (or an existing network, or resumeFrom(checkpoint)) is required");
            }
            if (resume != null && resume.ranks() != ranks) {
                throw new IllegalArgumentException("ranks=" + ranks + ": the checkpoint was written by "
                        + resume.ranks() + " ranks; resume with the same number");
            }
            if ((resume != null || checkpointFile != null) && processGroup != null) {
                throw new IllegalArgumentException("checkpoint/resumeFrom with a multi-process group: not supported"
                        + " (each process holds only its experts); use in-process ranks");
            }
            if (iterator == null && multiIterator == null) {
                throw new IllegalArgumentException("iterator=null: a DataSetIterator (or a MultiDataSetIterator) is"
                        + " required");
            }
            if (epochs < 1) {
                throw new IllegalArgumentException("epochs=" + epochs + ": must be >= 1");
            }
            if (timeout == null || timeout.isZero() || timeout.isNegative()) {
                throw new IllegalArgumentException("timeout=" + timeout + ": must be > 0");
            }
            return new ExpertParallelTrainer(this);
        }
    }
}

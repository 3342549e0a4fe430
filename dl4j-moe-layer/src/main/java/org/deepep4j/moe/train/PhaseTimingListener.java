package org.deepep4j.moe.train;

import org.deepep4j.moe.layers.MoELayerImpl;
import org.deepep4j.moe.layers.PhaseTimes;
import org.deeplearning4j.nn.api.Layer;
import org.deeplearning4j.nn.api.Model;
import org.deeplearning4j.nn.graph.ComputationGraph;
import org.deeplearning4j.nn.multilayer.MultiLayerNetwork;
import org.deeplearning4j.optimize.api.BaseTrainingListener;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

import java.util.LinkedHashMap;
import java.util.Map;

/**
 * Reports, per MoE layer and iteration, the time spent in routing, dispatch, expert compute and combine (forward and
 * backward together), so one sees which phase dominates: logged at INFO by this class's logger, and kept for
 * {@link #lastTimes()}. The expert-parallel trainer adds one on every rank when its {@code phaseTiming} setting is on
 * (default: the environment variable {@code DEEPEP4J_DEBUG_EP=1}); it can also be added to any network by hand.
 */
public class PhaseTimingListener extends BaseTrainingListener {

    public static final String ENV = "DEEPEP4J_DEBUG_EP";
    private static final Logger log = LoggerFactory.getLogger(PhaseTimingListener.class);

    private final String prefix;
    private final boolean logEachIteration;
    private volatile Map<Integer, PhaseTimes> last = new LinkedHashMap<>();

    public PhaseTimingListener() {
        this("");
    }

    /** @param prefix put before every line, e.g. "rank 1 " */
    public PhaseTimingListener(String prefix) {
        this(prefix, true);
    }

    /** @param logEachIteration false: only keep the times for {@link #lastTimes()} (a caller that reports them itself) */
    public PhaseTimingListener(String prefix, boolean logEachIteration) {
        this.prefix = prefix;
        this.logEachIteration = logEachIteration;
    }

    public static boolean enabledByEnvironment() {
        return "1".equals(System.getenv(ENV));
    }

    /** Times of the last iteration, by layer index. */
    public Map<Integer, PhaseTimes> lastTimes() {
        return last;
    }

    @Override
    public void iterationDone(Model model, int iteration, int epoch) {
        Layer[] layers = model instanceof MultiLayerNetwork ? ((MultiLayerNetwork) model).getLayers()
                : model instanceof ComputationGraph ? ((ComputationGraph) model).getLayers() : new Layer[0];
        Map<Integer, PhaseTimes> now = new LinkedHashMap<>();
        for (Layer l : layers) {
            if (l instanceof MoELayerImpl) {
                PhaseTimes t = ((MoELayerImpl) l).phaseTimes();
                now.put(l.getIndex(), t);
                if (logEachIteration) {
                    log.info("{}MoE layer {} iteration {}: {}", prefix, l.getIndex(), iteration, t);
                }
            }
        }
        last = now;
    }
}

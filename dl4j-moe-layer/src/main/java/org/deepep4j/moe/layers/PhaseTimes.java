package org.deepep4j.moe.layers;

/** Wall time a MoE layer spent per phase since the last reset (forward + backward of one iteration). */
public final class PhaseTimes {
    long routingNs;
    long dispatchNs;
    long expertNs;
    long combineNs;
    long sharedNs;
    /** Engine path: the engine block's forward and backward (router, dispatch, experts, combine, with host staging). */
    long engineNs;
    /** Engine path, GPU: the engine's host copies staging x, y and their gradients (part of engineNs). */
    long stagingNs;
    /** Engine path, GPU: bytes the engine staged between host and device. */
    long stagingBytes;
    /** Engine path: the experts' optimizer step in the engine. */
    long engineStepNs;
    /** Engine path: copies of expert weights / gradients / optimizer state between the engine and DL4J's views. */
    long syncNs;

    public double routingMs() { return routingNs / 1e6; }
    public double dispatchMs() { return dispatchNs / 1e6; }
    public double expertMs() { return expertNs / 1e6; }
    public double combineMs() { return combineNs / 1e6; }
    public double sharedExpertMs() { return sharedNs / 1e6; }
    public double engineMs() { return engineNs / 1e6; }
    public double engineStepMs() { return engineStepNs / 1e6; }
    public double viewSyncMs() { return syncNs / 1e6; }
    /** Host time of the engine's staging copies (caller's arrays <-> pinned memory); 0 on the CPU device. */
    public double stagingMs() { return stagingNs / 1e6; }
    public long stagingBytes() { return stagingBytes; }

    void reset() {
        routingNs = dispatchNs = expertNs = combineNs = sharedNs = engineNs = engineStepNs = syncNs = stagingNs = 0;
        stagingBytes = 0;
    }

    PhaseTimes copy() {
        PhaseTimes p = new PhaseTimes();
        p.routingNs = routingNs;
        p.dispatchNs = dispatchNs;
        p.expertNs = expertNs;
        p.combineNs = combineNs;
        p.sharedNs = sharedNs;
        p.engineNs = engineNs;
        p.engineStepNs = engineStepNs;
        p.syncNs = syncNs;
        p.stagingNs = stagingNs;
        p.stagingBytes = stagingBytes;
        return p;
    }

    @Override
    public String toString() {
        if (engineNs > 0) {
            return String.format("engine block %.2f ms (host staging copies %.2f ms), engine step %.2f ms, view sync %.2f ms,"
                    + " shared expert %.2f ms", engineMs(), stagingMs(), engineStepMs(), viewSyncMs(), sharedExpertMs());
        }
        return String.format("routing %.2f ms, dispatch %.2f ms, expert compute %.2f ms, combine %.2f ms, shared expert %.2f ms",
                routingMs(), dispatchMs(), expertMs(), combineMs(), sharedExpertMs());
    }
}

package org.deepep4j.moe.layers;

/** Wall time a MoE layer spent per phase since the last reset (forward + backward of one iteration). */
public final class PhaseTimes {
    long routingNs;
    long dispatchNs;
    long expertNs;
    long combineNs;
    long sharedNs;

    public double routingMs() { return routingNs / 1e6; }
    public double dispatchMs() { return dispatchNs / 1e6; }
    public double expertMs() { return expertNs / 1e6; }
    public double combineMs() { return combineNs / 1e6; }
    public double sharedExpertMs() { return sharedNs / 1e6; }

    void reset() {
        routingNs = dispatchNs = expertNs = combineNs = sharedNs = 0;
    }

    PhaseTimes copy() {
        PhaseTimes p = new PhaseTimes();
        p.routingNs = routingNs;
        p.dispatchNs = dispatchNs;
        p.expertNs = expertNs;
        p.combineNs = combineNs;
        p.sharedNs = sharedNs;
        return p;
    }

    @Override
    public String toString() {
        return String.format("routing %.2f ms, dispatch %.2f ms, expert compute %.2f ms, combine %.2f ms, shared expert %.2f ms",
                routingMs(), dispatchMs(), expertMs(), combineMs(), sharedExpertMs());
    }
}

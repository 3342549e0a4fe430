package org.deepep4j.moe.conf;

/** Where the routed experts' weights are authoritative when a {@link MoELayer} runs on the engine block. */
public enum ExpertResidency {
    /**
     * In the engine (GPU memory on CUDA) across steps, with their optimizer state; the engine applies the network's
     * updater (SGD, Adam, Adam + WeightDecay as AdamW) and DL4J's own updater leaves them alone. DL4J's views are
     * brought up to date after every step ({@code syncViewsEveryStep}, default) or on reads through the layer.
     */
    ENGINE,
    /**
     * In DL4J's parameter views: every forward writes them to the engine, every backward brings the gradients back,
     * and DL4J's updater (any) updates them. Costs two copies of the experts per step; meant for gradient checks and
     * small models.
     */
    HOST
}

package org.deepep4j.moe;

import org.deepep4j.moe.conf.MoELayer;
import org.deepep4j.moe.train.ExpertSharding;
import org.deeplearning4j.nn.multilayer.MultiLayerNetwork;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.function.Executable;
import org.nd4j.linalg.api.buffer.DataType;
import org.nd4j.linalg.learning.config.Adam;

import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

/** Bad settings fail early with a message naming the setting, its value and the rule. */
class ConfigValidationTest {

    private static void rejects(Executable build, String... words) {
        Exception e = assertThrows(RuntimeException.class, build);
        for (String w : words) {
            assertTrue(e.getMessage().contains(w), "message '" + e.getMessage() + "' lacks '" + w + "'");
        }
    }

    @Test
    void layerSettings() {
        rejects(() -> Nets.moe().topK(5).build(), "topK=5", "numExperts=4");
        rejects(() -> Nets.moe().topK(0).build(), "topK=0");
        rejects(() -> Nets.moe().numExperts(0).topK(1).build(), "numExperts=0", ">= 1");
        rejects(() -> new MoELayer.Builder().numExperts(4).topK(2).build(), "ffnSize=-1", ">= 1");
        rejects(() -> Nets.moe().epSize(3).build(), "numExperts=4", "divisible by epSize=3");
        rejects(() -> Nets.moe().auxLossCoefficient(-1).build(), "auxLossCoefficient=-1.0");
        rejects(() -> Nets.moe().biasUpdateRate(Double.NaN).build(), "biasUpdateRate=NaN");
        rejects(() -> Nets.moe().sharedExpertFfnSize(-2).build(), "sharedExpertFfnSize=-2");
        rejects(() -> Nets.moe().nIn(8).nOut(4).build(), "nOut=4", "must equal nIn=8");
        // nOut on a layer whose nIn comes from the input type: refused naming both, not rewritten
        rejects(() -> Nets.ff(DataType.FLOAT, new Adam(), Nets.moe().nOut(7), 16), "MoELayer nOut=7",
                "must equal the input size 16");
        rejects(() -> ExpertSharding.withEpSize(Nets.ff(DataType.FLOAT, new Adam(), Nets.moe()), 3),
                "numExperts=4", "epSize=3");
    }

    @Test
    void inputAndBinding() {
        MultiLayerNetwork net = new MultiLayerNetwork(Nets.ff(DataType.FLOAT, new Adam(), Nets.moe()));
        net.init();
        org.deeplearning4j.nn.api.Layer moe = net.getLayer(1);
        rejects(() -> moe.activate(Nets.input(DataType.FLOAT, 1, 3, 5), false,
                org.deeplearning4j.nn.workspace.LayerWorkspaceMgr.noWorkspaces()), "input shape=[3, 5]",
                "[mb, 6] or [mb, 6, T]");
        MultiLayerNetwork sharded = new MultiLayerNetwork(ExpertSharding.withEpSize(
                Nets.ff(DataType.FLOAT, new Adam(), Nets.moe()), 2));
        sharded.init();
        rejects(() -> sharded.output(Nets.input(DataType.FLOAT, 1, 3, Nets.N_IN)), "epSize=2",
                "no expert exchange bound");
    }
}

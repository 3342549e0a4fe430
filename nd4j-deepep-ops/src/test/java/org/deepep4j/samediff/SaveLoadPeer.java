package org.deepep4j.samediff;

import java.io.File;
import java.time.Duration;
import java.util.Collections;
import org.deepep4j.EpBuffer;
import org.deepep4j.EpGroup;
import org.nd4j.autodiff.samediff.SameDiff;
import org.nd4j.linalg.api.ndarray.INDArray;
import org.nd4j.linalg.factory.Nd4j;

/** Another process for {@link SaveLoadTest}: builds a 1-rank graph, saves it and its output to the folder args[0]. */
public final class SaveLoadPeer {
  public static void main(String[] args) throws Exception {
    DeepEp.install();
    File dir = new File(args[0]);
    try (EpGroup group = EpGroup.inProcess(1)) {
      group.runOnAllRanks(rank -> {
        try (EpBuffer buf = group.buffer(rank, SameDiffOpsTest.SMALL)) {
          SameDiff sd = SaveLoadTest.graph(buf, rank, 1);
          INDArray out = sd.output(Collections.emptyMap(), "out").get("out");
          Nd4j.saveBinary(out, new File(dir, "out.bin"));
          sd.save(new File(dir, "graph.fb"), true);
        }
        return null;
      }, Duration.ofSeconds(60));
    }
    System.out.println("SAVED");
    System.exit(0);
  }
}

package org.deepep4j;

import java.time.Duration;
import java.util.Arrays;
import java.util.Locale;
import java.util.Random;
import org.nd4j.linalg.api.buffer.DataType;
import org.nd4j.linalg.api.ndarray.INDArray;
import org.nd4j.linalg.factory.Nd4j;

/**
 * What host arrays cost on a CUDA buffer: one dispatch (with weights) + weighted combine per step, with ND4J host
 * arrays (staged through pinned memory by EpBuffer) and with EpDeviceArrays (nothing crosses), same data, in-process
 * ranks (rank r on GPU r mod count). Prints the median step of rank 0 for each form, the staging share
 * (1 - device / host) and the bytes that cross per rank and step.
 * Usage: {@code StagingBenchmark hidden tokensPerRank experts topK ranks steps [device]} (device CUDA or CPU).
 */
public final class StagingBenchmark {
  private StagingBenchmark() {}

  public static void main(String[] a) {
    int h = Integer.parseInt(a[0]), n = Integer.parseInt(a[1]), e = Integer.parseInt(a[2]), k = Integer.parseInt(a[3]);
    int ranks = Integer.parseInt(a[4]), steps = Integer.parseInt(a[5]);
    EpDevice device = a.length > 6 ? EpDevice.valueOf(a[6]) : EpDevice.CUDA;
    double[] host = new double[steps], dev = new double[steps];
    long[] recvRows = new long[1];
    EpConfig config = EpConfig.builder().device(device).bufferSizeGb(1.0).timeout(Duration.ofSeconds(60)).build();
    try (EpGroup group = EpGroup.inProcess(ranks)) {
      group.runOnAllRanks(rank -> {
        Random rnd = new Random(rank);
        long[] idx = new long[n * k];
        for (int t = 0; t < n; ++t) {  // k distinct experts per token
          int[] perm = rnd.ints(0, e).distinct().limit(k).toArray();
          for (int j = 0; j < k; ++j) idx[t * k + j] = perm[j];
        }
        INDArray x = Nd4j.rand(DataType.FLOAT, n, h), topk = Nd4j.createFromArray(idx).reshape(n, k);
        INDArray w = Nd4j.rand(DataType.FLOAT, n, k);
        try (EpBuffer buf = group.buffer(rank, config); EpDeviceArray xd = buf.toDevice(x);
             EpDeviceArray idxd = buf.toDevice(topk); EpDeviceArray wd = buf.toDevice(w)) {
          for (int s = -1; s < steps; ++s) {  // step -1: warm-up
            long t0 = System.nanoTime();
            EpDispatchResult d = buf.dispatch(x, topk, w, e);
            buf.combine(d.recvX(), d.handle(), d.recvTopkWeights());
            d.handle().close();
            long t1 = System.nanoTime();
            EpDeviceDispatchResult dd = buf.dispatch(xd, idxd, wd, e);
            EpDeviceArray out = buf.combine(dd.recvX(), dd.handle(), dd.recvTopkWeights());
            try (EpDeviceArray probe = buf.allocate(DataType.BYTE, 1)) {
              probe.toHost();  // the device work is complete (the queue synchronised) before the clock stops
            }
            long t2 = System.nanoTime();
            if (rank == 0) recvRows[0] = dd.recvX().size(0);
            out.close();
            dd.recvX().close();
            dd.recvTopkIdx().close();
            dd.recvTopkWeights().close();
            dd.handle().close();
            if (rank == 0 && s >= 0) {
              host[s] = (t1 - t0) / 1e6;
              dev[s] = (t2 - t1) / 1e6;
            }
          }
        }
        return null;
      }, Duration.ofSeconds(600));
    }
    double hm = median(host), dm = median(dev);
    long m = recvRows[0];
    double in = (double) n * h * 4 + n * k * 12.0 + m * h * 4.0, out = m * (h * 4.0 + k * 12.0) + (double) n * h * 4;
    System.out.printf(Locale.ROOT, "EpBuffer dispatch + weighted combine on %s, %d ranks, hidden %d, %d tokens per rank,"
        + " top-%d of %d, fp32, median of %d steps of rank 0:%n", device, ranks, h, n, k, e, steps);
    System.out.println("| arrays | step ms | staging share | bytes crossing per rank and step |");
    System.out.println("|---|---|---|---|");
    boolean staged = device == EpDevice.CUDA;  // on the CPU device host arrays are used in place: nothing crosses
    System.out.printf(Locale.ROOT, "| host INDArrays (%s) | %.3f | %s | %s |%n", staged ? "staged" : "in place", hm,
        staged ? String.format(Locale.ROOT, "%.0f%%", 100 * (1 - dm / hm)) : "-",
        staged ? String.format(Locale.ROOT, "%.1f MB in + %.1f MB out", in / 1e6, out / 1e6) : "0");
    System.out.printf(Locale.ROOT, "| EpDeviceArray | %.3f | - | 0 |%n", dm);
  }

  private static double median(double[] v) {
    double[] s = v.clone();
    Arrays.sort(s);
    return s[s.length / 2];
  }
}
